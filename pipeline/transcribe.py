"""Stream recordings through the runtime: one through a session (as fast as possible or paced like a live source),
or many at once through the multi-stream engine."""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterator, Sequence
from typing import TextIO

import numpy as np

from pipeline.checkpoint import ASRModel
from pipeline.engine import EngineOptions, StreamingEngine
from pipeline.features import SAMPLE_RATE
from pipeline.options import SessionOptions
from pipeline.session import StreamingSession, TranscriptEvent


def stream_recording(
    session: StreamingSession,
    audio: np.ndarray,
    chunk_sec: float = 0.1,
    realtime: bool = False,
    finalize_every_sec: float | None = None,
    context_updates: Sequence[tuple[float, str]] = (),
) -> Iterator[TranscriptEvent]:
    """Feed `audio` (16 kHz mono float32) in `chunk_sec` pieces and yield every event, then finish.

    With `realtime`, a chunk is fed no earlier than its end time on the wall clock since the start, as a
    microphone would deliver it; if decoding falls behind, chunks are fed as soon as possible (no skipping).
    `finalize_every_sec`: after each chunk that completes this much more audio, `finalize_now`.
    `context_updates`: (seconds, text): after the chunk that reaches that much audio, `update_context(text)`.
    """
    if chunk_sec <= 0:
        raise ValueError(f"chunk_sec is {chunk_sec}; expected > 0")
    chunk = max(1, round(chunk_sec * SAMPLE_RATE))
    finalize_every = None if finalize_every_sec is None else round(finalize_every_sec * SAMPLE_RATE)
    updates = sorted((round(seconds * SAMPLE_RATE), text) for seconds, text in context_updates)
    started = time.monotonic()
    for start in range(0, audio.size, chunk):
        piece = audio[start : start + chunk]
        end = start + piece.size
        if realtime:
            time.sleep(max(0.0, end / SAMPLE_RATE - (time.monotonic() - started)))
        yield from session.push_audio(piece)
        while updates and updates[0][0] <= end:
            session.update_context(updates.pop(0)[1])
        if finalize_every is not None and end // finalize_every > start // finalize_every:
            yield from session.finalize_now()
    yield from session.finish()


def transcribe_recordings(
    model: ASRModel, options: SessionOptions, recordings: dict[str, np.ndarray], max_streams: int = 16
) -> Iterator[tuple[str, TranscriptEvent]]:
    """Transcribe many recordings together, as fast as possible: up to `max_streams` at a time in one
    `StreamingEngine` (one batched encoder forward and decoder update per step), the rest admitted as slots free.

    Yields (name, event) in step order; each recording's events are exactly those of its own session.
    """
    if max_streams < 1:
        raise ValueError(f"max_streams is {max_streams}; expected at least 1")
    engine = StreamingEngine(model, options, EngineOptions(max_streams=min(max_streams, len(recordings))))
    waiting = list(recordings)
    while waiting or engine.active_streams:
        while waiting and engine.free_slots:
            name = waiting.pop(0)
            engine.open_stream(name)
            engine.push_audio(name, recordings[name])
            engine.finish_stream(name)
        for name, events in engine.step().items():
            for event in events:
                yield name, event


# ---------------------------------------------------------------------------------------------
# Terminal display
# ---------------------------------------------------------------------------------------------

# C0/C1 controls and DEL, line/paragraph separators, and the bidi marks, embeddings, overrides and isolates:
# everything that can move the cursor, clear the screen, end the line or reorder how the rest of it reads.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def terminal_text(text: str) -> str:
    """`text` with control characters escaped as Python writes them (ESC -> `\\x1b`, CR -> `\\r`).

    Transcripts are model output and file names are user input: shown raw, an ESC or CR in either could rewrite
    the terminal. JSON output is exact and does not go through this.
    """
    return _CONTROL.sub(lambda match: match.group().encode("unicode_escape").decode("ascii"), text)


class StatusLine:
    """Progress of one transcription on stderr: audio done, the committed text, the tentative tail (dimmed).

    On a terminal it is one line rewritten in place; elsewhere (a pipe, a log file) it is a plain line at each
    segment end and at the end of the stream, so no cursor movements or colours land in files.
    """

    def __init__(self, duration_sec: float, stream: TextIO | None = None, width: int = 60) -> None:
        self.duration_sec = duration_sec
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.interactive = self.stream.isatty()
        self.committed = ""

    def update(self, event: TranscriptEvent) -> None:
        self.committed += "".join(" " + word.text for word in event.new_words)
        progress = f"[{event.audio_sec:6.1f}/{self.duration_sec:.1f}s]"
        committed = terminal_text(self.committed)[-self.width :]
        tentative = terminal_text(event.tentative)[: self.width * 2 // 3]
        if self.interactive:
            line = f"{progress}{committed} \033[2m{tentative}\033[0m"
            print(f"\r\033[K{line}", end="", file=self.stream, flush=True)
        elif event.kind in ("segment", "final"):
            print(f"{progress}{committed}", file=self.stream, flush=True)

    def close(self) -> None:
        """End the rewritten line, so what follows starts on its own."""
        if self.interactive:
            print(file=self.stream, flush=True)
