"""Stream a whole recording through a session, as fast as possible or paced like a live source."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np

from pipeline.features import SAMPLE_RATE
from pipeline.session import StreamingSession, TranscriptEvent


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
