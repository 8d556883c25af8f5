"""The stage batching policy alone (`deployments.batching.StageBatcher`), on a simulated stage: no model, no Ray,
so the figures depend on the policy, not on how busy the machine is.

Live streams call the stage once per block (every `--period` seconds, each at its own random phase, as paced
clients do); the stage's forward takes `--forward-ms` plus `--per-call-ms` per call of the batch. Backlogged
streams (`--backlogged`) call again as soon as they are answered. Reports each call's wait (submit to answer,
minus its batch's forward), the batches' mean size, and the stage's busy fraction.

    python scripts/bench_batcher.py --live 64 --wait-ms 200 --forward-ms 100 [--backlogged 8] [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics

from deployments.batching import StageBatcher


async def _simulate(args: argparse.Namespace) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    batches: list[int] = []
    busy = 0.0

    async def forward(requests: list[str]) -> list[float]:
        nonlocal busy
        seconds = (args.forward_ms + args.per_call_ms * len(requests)) / 1e3
        batches.append(len(requests))
        busy += seconds
        await asyncio.sleep(seconds)
        return [seconds] * len(requests)

    batcher = StageBatcher(forward, max_batch_size=args.max_batch, wait_s=args.wait_ms / 1e3)
    waits: list[float] = []
    end = loop.time() + args.seconds

    async def call(name: str) -> None:
        started = loop.time()
        forward_s = await batcher.submit(name, caller=name)
        waits.append(loop.time() - started - forward_s)

    async def live(name: str, phase: float) -> None:
        await asyncio.sleep(phase)
        while loop.time() < end:
            due = loop.time() + args.period
            await call(name)
            await asyncio.sleep(max(0.0, due - loop.time()))

    async def backlogged(name: str) -> None:
        while loop.time() < end:
            await call(name)

    rng = random.Random(args.seed)
    started = loop.time()
    await asyncio.gather(
        *(live(f"live{i}", rng.uniform(0, args.period)) for i in range(args.live)),
        *(backlogged(f"backlogged{i}") for i in range(args.backlogged)),
    )
    elapsed = loop.time() - started
    waits.sort()
    return {
        "calls": len(waits),
        "wait_p50_ms": 1e3 * statistics.median(waits),
        "wait_p95_ms": 1e3 * waits[int(0.95 * (len(waits) - 1))],
        "mean_batch": statistics.fmean(batches),
        "busy": busy / elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--live", type=int, default=64, help="paced streams")
    parser.add_argument("--backlogged", type=int, default=0, help="streams that call again at once")
    parser.add_argument("--period", type=float, default=1.92, help="seconds between a live stream's calls")
    parser.add_argument("--wait-ms", type=float, default=200.0, help="the batch wait")
    parser.add_argument("--forward-ms", type=float, default=100.0, help="a forward's fixed cost")
    parser.add_argument("--per-call-ms", type=float, default=2.0, help="a forward's cost per call in it")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=0)
    result = asyncio.run(_simulate(parser.parse_args()))
    print(" ".join(f"{key}={value:.3f}" if isinstance(value, float) else f"{key}={value}" for key, value in result.items()))


if __name__ == "__main__":
    main()
