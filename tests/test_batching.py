"""Stage batches form when the stage is free: every call that arrived during the last forward goes into the next."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
from pathlib import Path

import pytest

from deployments.batching import StageBatcher


class SlowStage:
    """A stage whose forward takes `forward_s`; records each batch."""

    def __init__(self, forward_s: float, fail_on: object = None) -> None:
        self.forward_s, self.fail_on = forward_s, fail_on
        self.batches: list[list[object]] = []

    async def run(self, requests: list[object]) -> list[object]:
        self.batches.append(list(requests))
        await asyncio.sleep(self.forward_s)
        if self.fail_on in requests:
            raise RuntimeError(f"stage failed on {self.fail_on!r}")
        return [("done", request) for request in requests]


async def _call_at(batcher: StageBatcher, request: object, delay_s: float) -> object:
    await asyncio.sleep(delay_s)
    return await batcher.submit(request, caller=request)


def test_calls_arriving_during_a_forward_run_together_next() -> None:
    """Five calls 0.2 s apart, each forward 1 s: the first runs alone, the four that arrived during it run as one
    batch (Serve's `@serve.batch` runs these as five batches of one, 5 s)."""
    stage = SlowStage(forward_s=1.0)

    async def main() -> list[object]:
        batcher = StageBatcher(stage.run, max_batch_size=64, wait_s=0.05)
        return await asyncio.gather(*(_call_at(batcher, i, 0.2 * i) for i in range(5)))

    assert asyncio.run(main()) == [("done", i) for i in range(5)]
    assert stage.batches == [[0], [1, 2, 3, 4]]


def test_callers_that_come_straight_back_join_the_calls_waiting_for_the_next_batch() -> None:
    """Two groups of streams out of step, each stream calling again 10 ms after its answer (its next block was
    encoded during the call): once a stream has come back that promptly, a batch it was in waits for it to come
    back, so the groups merge (from the streams' second round on) instead of alternating on the stage forever."""
    stage = SlowStage(forward_s=0.3)

    async def stream(batcher: StageBatcher, name: str, start_s: float) -> None:
        await asyncio.sleep(start_s)
        for round_index in range(4):
            await batcher.submit(f"{name}{round_index}", name)
            await asyncio.sleep(0.01)

    async def main() -> None:
        batcher = StageBatcher(stage.run, max_batch_size=64, wait_s=0.1)
        await asyncio.gather(*(stream(batcher, name, 0.0) for name in "ab"), *(stream(batcher, name, 0.15) for name in "cd"))

    asyncio.run(main())
    assert stage.batches[:3] == [["a0", "b0"], ["c0", "d0"], ["a1", "b1"]]
    assert sorted(stage.batches[3]) == ["a2", "b2", "c1", "d1"]
    assert [len(batch) for batch in stage.batches] == [2, 2, 2, 4, 4, 2]


def test_callers_that_do_not_come_straight_back_are_not_waited_for() -> None:
    """A live stream calls again 0.6 s after each answer (its next block is audio still to come), beyond the
    0.2 s batch wait: after its batch, the call that arrived during the forward runs at once instead of idling the
    stage for the wait, so a call arriving 0.1 s later goes into the batch after that. (Waiting for the live
    stream would have put both into one batch, 0.2 s after the first ended.)"""
    stage = SlowStage(forward_s=0.3)

    async def live(batcher: StageBatcher) -> None:
        for round_index in range(2):
            await batcher.submit(f"live{round_index}", "live")
            await asyncio.sleep(0.6)

    async def main() -> None:
        batcher = StageBatcher(stage.run, max_batch_size=64, wait_s=0.2)
        # live0 runs 0.2-0.5 s (after the idle wait); "during" arrives at 0.25 s, "after" at 0.6 s.
        await asyncio.gather(live(batcher), _call_at(batcher, "during", 0.25), _call_at(batcher, "after", 0.6))

    asyncio.run(main())
    assert stage.batches[:3] == [["live0"], ["during"], ["after"]]


def test_an_idle_stage_waits_for_calls_of_the_same_moment_and_caps_the_batch() -> None:
    """Calls 10 ms apart find the stage idle: the first waits (0.5 s) for company; a batch holds at most
    `max_batch_size` calls, in arrival order, the rest go into the next; after an idle spell the wait applies
    again. (Margins of tenths of a second: the calls' order, not their timing, is what is checked.)"""
    stage = SlowStage(forward_s=0.1)

    async def main() -> None:
        batcher = StageBatcher(stage.run, max_batch_size=3, wait_s=0.5)
        await asyncio.gather(*(_call_at(batcher, i, 0.01 * i) for i in range(5)))
        await asyncio.sleep(0.3)
        await asyncio.gather(_call_at(batcher, "a", 0), _call_at(batcher, "b", 0.01))

    asyncio.run(main())
    assert stage.batches == [[0, 1, 2], [3, 4], ["a", "b"]]


def test_no_wait_runs_the_first_call_at_once() -> None:
    stage = SlowStage(forward_s=0.5)

    async def main() -> None:
        batcher = StageBatcher(stage.run, max_batch_size=8, wait_s=0.0)
        await asyncio.gather(*(_call_at(batcher, i, 0.1 * i) for i in range(3)))

    asyncio.run(main())
    assert stage.batches == [[0], [1, 2]]


def test_a_failed_batch_fails_each_of_its_calls_and_the_next_batch_runs() -> None:
    stage = SlowStage(forward_s=0.1, fail_on=1)

    async def main() -> list[object]:
        batcher = StageBatcher(stage.run, max_batch_size=8, wait_s=0.3)
        return await asyncio.gather(
            *(_call_at(batcher, i, delay) for i, delay in ((0, 0), (1, 0.01), (2, 0.8))), return_exceptions=True
        )

    results = asyncio.run(main())
    assert [str(result) for result in results[:2]] == ["stage failed on 1"] * 2
    assert results[2] == ("done", 2)
    assert stage.batches == [[0, 1], [2]]


def test_a_cancelled_caller_is_left_out_of_its_batch() -> None:
    stage = SlowStage(forward_s=0.5)

    async def main() -> object:
        batcher = StageBatcher(stage.run, max_batch_size=8, wait_s=0.0)
        first = asyncio.create_task(batcher.submit("first"))
        await asyncio.sleep(0.05)  # "first" is running; these two wait for the next batch
        gone = asyncio.create_task(batcher.submit("gone"))
        kept = asyncio.create_task(batcher.submit("kept"))
        await asyncio.sleep(0.01)
        gone.cancel()
        await first
        return await kept

    assert asyncio.run(main()) == ("done", "kept")
    assert stage.batches == [["first"], ["kept"]]


def test_a_stage_answering_the_wrong_number_of_results_fails_its_calls() -> None:
    async def short(requests: list[object]) -> list[object]:
        return requests[:-1]

    async def main() -> None:
        batcher = StageBatcher(short, max_batch_size=8, wait_s=0.01)
        await asyncio.gather(batcher.submit(1), batcher.submit(2))

    with pytest.raises(ValueError, match="1 results for a batch of 2 calls"):
        asyncio.run(main())


@pytest.mark.parametrize(("size", "wait", "message"), [(0, 0.0, "max_batch_size=0"), (1, -1.0, "wait_s=-1.0")])
def test_bad_settings_are_refused(size: int, wait: float, message: str) -> None:
    async def run(requests: list[object]) -> list[object]:
        return requests

    with pytest.raises(ValueError, match=message):
        StageBatcher(run, max_batch_size=size, wait_s=wait)


def test_the_batcher_bench_merges_backlogged_streams_and_counts_every_live_call() -> None:
    """`scripts/bench_batcher.py` on a short run: four backlogged streams run as one batch of four every round,
    and the live streams' calls are answered and timed, one per period."""
    spec = importlib.util.spec_from_file_location("bench_batcher", Path(__file__).parent.parent / "scripts" / "bench_batcher.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    settings = dict(period=0.2, wait_ms=50.0, forward_ms=20.0, per_call_ms=1.0, max_batch=64, seconds=0.6, seed=0)
    backlogged = asyncio.run(bench._simulate(argparse.Namespace(live=0, backlogged=4, **settings)))
    assert backlogged["mean_batch"] == 4.0
    live = asyncio.run(bench._simulate(argparse.Namespace(live=5, backlogged=0, **settings)))
    assert 5 * 2 <= live["calls"] <= 5 * 3  # each live stream: one call per 0.2 s period over 0.6 s
