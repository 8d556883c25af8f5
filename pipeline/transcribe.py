"""Stream recordings through the runtime: one through a session (as fast as possible or paced like a live source),
or many at once through the multi-stream engine."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np

from pipeline.checkpoint import ASRModel
from pipeline.engine import EngineOptions, StreamingEngine
from pipeline.features import SAMPLE_RATE
from pipeline.session import SessionOptions, StreamingSession, TranscriptEvent


def stream_recording(
    session: StreamingSession, audio: np.ndarray, chunk_sec: float = 0.1, realtime: bool = False
) -> Iterator[TranscriptEvent]:
    """Feed `audio` (16 kHz mono float32) in `chunk_sec` pieces and yield every event, then finish.

    With `realtime`, a chunk is fed no earlier than its end time on the wall clock since the start, as a
    microphone would deliver it; if decoding falls behind, chunks are fed as soon as possible (no skipping).
    """
    if chunk_sec <= 0:
        raise ValueError(f"chunk_sec is {chunk_sec}; expected > 0")
    chunk = max(1, round(chunk_sec * SAMPLE_RATE))
    started = time.monotonic()
    for start in range(0, audio.size, chunk):
        piece = audio[start : start + chunk]
        if realtime:
            due = (start + piece.size) / SAMPLE_RATE
            time.sleep(max(0.0, due - (time.monotonic() - started)))
        yield from session.push_audio(piece)
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
