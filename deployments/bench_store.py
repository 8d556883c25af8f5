"""`qwen3-stream bench store`: what the session store costs a stream: round trips per stream-minute and the
latency a segment roll adds (one `save_roll` of a real checkpoint), against the embedded server or a given URL.

The checkpoint is a real one: a tiny-model session streamed through a roll, so its size (pending mel of up to a
block, the front-end's samples, the commit state) is what a served stream writes.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deployments.embedded_store import EmbeddedStore
from deployments.session_store import DurableState, SessionStore
from pipeline.checkpoint import load_model
from pipeline.decoding import DecodeOptions
from pipeline.options import SessionOptions
from pipeline.session import StreamingSession, checkpoint_offset
from pipeline.tiny_checkpoint import TOWER_OVERLAY_DIR, make_tiny_checkpoint

#: A stream's segments last 12-16 s (DESIGN.md): rolls per minute of audio at the two ends.
ROLLS_PER_MINUTE = (60 / 16, 60 / 12)


@dataclass
class StoreBenchResult:
    server: str
    checkpoint_bytes: int
    rolls: int
    roll_p50_ms: float
    roll_p95_ms: float
    round_trips_per_roll: float
    round_trips_per_stream_minute: tuple[float, float]  # at 16 s and 12 s segments, incl. create and finish


def real_checkpoint() -> bytes:
    """A checkpoint taken at a real roll of a tiny-model session fed noise."""
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = make_tiny_checkpoint(Path(scratch) / "tiny", with_tower=True)
        model = load_model(checkpoint, tower=checkpoint / TOWER_OVERLAY_DIR)
    session = StreamingSession(model, SessionOptions(decode=DecodeOptions(max_new_tokens=8)))
    noise = (0.1 * np.random.default_rng(0).standard_normal(16_000 * 30)).astype(np.float32)
    for start in range(0, noise.size, 1600):
        for event in session.push_audio(noise[start : start + 1600]):
            if event.checkpoint is not None:
                return event.checkpoint
    raise AssertionError("30 s of audio made no segment roll")


async def measure(url: str, checkpoint: bytes, rolls: int) -> StoreBenchResult:
    store = await SessionStore.connect(url)
    try:
        lease = await store.create("bench-session", "bench", b"config")
        words = [f"word{i}" for i in range(40)]
        before = store.round_trips
        latencies = []
        for index in range(rolls):
            words += [f"w{index}-{j}" for j in range(30)]  # ~30 words per 12-16 s segment
            state = DurableState(checkpoint, index + 1, checkpoint_offset(checkpoint), len(words), list(words))
            started = time.perf_counter()
            await store.save_roll(lease, state)
            latencies.append(time.perf_counter() - started)
        per_roll = (store.round_trips - before) / rolls
        await store.finish(lease)
    finally:
        await store.close()
    ms = np.asarray(latencies) * 1000
    # create + finish once per stream (amortised over a minute here: a conservative one-minute stream)
    per_minute = tuple(per_roll * rate + 2 for rate in ROLLS_PER_MINUTE)
    return StoreBenchResult(
        url, len(checkpoint), rolls, float(np.percentile(ms, 50)), float(np.percentile(ms, 95)), per_roll, per_minute
    )


def run_store_bench(url: str | None, rolls: int) -> StoreBenchResult:
    checkpoint = real_checkpoint()
    if url is not None:
        return asyncio.run(measure(url, checkpoint, rolls))
    with EmbeddedStore() as server:
        result = asyncio.run(measure(server.url, checkpoint, rolls))
    result.server = "embedded valkey-server"
    return result


def format_store_result(result: StoreBenchResult) -> str:
    low, high = result.round_trips_per_stream_minute
    return "\n".join(
        [
            f"Session store cost (measured here; {result.server}; checkpoint {result.checkpoint_bytes / 1024:.0f} KiB)",
            "",
            "| rolls | roll write p50 (ms) | p95 (ms) | round trips per roll | round trips per stream-minute |",
            "|---:|---:|---:|---:|---:|",
            f"| {result.rolls} | {result.roll_p50_ms:.2f} | {result.roll_p95_ms:.2f} | "
            f"{result.round_trips_per_roll:.1f} | {low:.1f}–{high:.1f} (16 s–12 s segments, with create + finish) |",
        ]
    )
