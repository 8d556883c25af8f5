"""Healthy background traffic for fault tests: paced streams of one recording, back to back, in a process of its own.

`python -m tests.faults._healthy_traffic ADDRESS AUDIO.npy DIR` streams AUDIO.npy (float32, 16 kHz) in real time
(100 ms chunks) through the client library, again and again, until DIR/stop exists. It appends one JSON line per
event to DIR/events.jsonl: `{"event": "started", "n": N, "t": time.time()}` when stream N got its Started, then
`{"event": "done", "n": N, "text", "token_ids", "results"}` (results: the comparable fields of every Result) or
`{"event": "error", "n": N, "error": "..."}`. A process, not a thread: the tests' own grpc.aio calls run their
own event loops, and the paced stream keeps its pace whatever the test process does.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import grpc
import numpy as np

from deployments.client import RecognizerClient, StreamOptions

OPTIONS = StreamOptions(chunk_ms=100, realtime=True)


def comparable(result) -> list:  # noqa: ANN001 (asr_pb2.Result)
    return [
        [[w.index, w.text, w.start_ms, w.end_ms] for w in result.committed],
        result.interim,
        result.segment_index,
        result.audio_processed_ms,
        result.segment_final,
    ]


async def main(address: str, audio: np.ndarray, out: Path) -> None:
    events = (out / "events.jsonl").open("a", buffering=1)

    def emit(**event) -> None:  # noqa: ANN003
        events.write(json.dumps(event) + "\n")

    async with RecognizerClient(address) as client:
        n = 0
        while not (out / "stop").exists():
            try:
                outcome = await client.recognize(
                    audio, OPTIONS, on_started=lambda _started, n=n: emit(event="started", n=n, t=time.time())
                )
                emit(
                    event="done",
                    n=n,
                    t=time.time(),
                    text=outcome.text,
                    final_text=outcome.final.text if outcome.final is not None else None,
                    token_ids=list(outcome.final.token_ids) if outcome.final is not None else None,
                    results=[comparable(r) for _, r in outcome.results],
                )
            except grpc.aio.AioRpcError as error:
                emit(event="error", n=n, t=time.time(), error=f"{error.code().name}: {error.details()}")
            except Exception as error:  # noqa: BLE001 (reported to the test, which fails on it)
                emit(event="error", n=n, t=time.time(), error=f"{type(error).__name__}: {error}")
            n += 1
    events.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], np.load(sys.argv[2]), Path(sys.argv[3])))
