"""The step probes: peak bytes of what a piece of code allocates, its time inside tensor operators, its calls."""

from __future__ import annotations

import gc
import time

import torch

from pipeline.step_probes import CollectorClock, OpClock, PeakTensorBytes, PythonCalls


def test_peak_counts_fresh_allocations_until_freed_and_never_what_existed_before() -> None:
    existing = torch.zeros(10_000)
    with PeakTensorBytes() as probe:
        a = torch.ones(100, 100)  # 40,000 bytes
        b = a @ a  # 40,000
        del a
        c = torch.zeros(50, 100)  # 20,000
        existing.add_(1)  # in place: no allocation
        view = b[2:]  # a view: no allocation
    assert probe.peak == 80_000
    assert probe.live == 60_000
    del b, c, view
    assert probe.live == 0


def test_op_clock_splits_wall_time_into_operators_and_the_rest() -> None:
    x = torch.randn(300, 300)
    started = time.perf_counter()
    with OpClock() as clock:
        for _ in range(5):
            x = x @ x.T / 300
        time.sleep(0.05)  # host work: not inside an operator
    wall = time.perf_counter() - started
    assert clock.ops >= 10 and 0 < clock.seconds < wall
    assert 0.04 < clock.host_seconds(wall) < 0.05 + clock.seconds


def test_collector_clock_times_the_collections_inside_it_and_only_those() -> None:
    gc.collect()
    with CollectorClock() as clock:
        gc.collect(0)
        gc.collect(2)
    gc.collect()  # outside: not counted
    assert clock.runs == [1, 0, 1]
    assert clock.seconds > 0



def test_python_calls_counts_every_call_on_this_thread_and_nothing_else() -> None:
    def twice(value: int) -> int:
        return abs(value) * 2  # one Python call and one C call per use

    with PythonCalls() as empty:  # the probe's own exit
        pass
    with PythonCalls() as probe:
        for value in range(10):
            twice(value)
    assert probe.calls - empty.calls == 20
    with PythonCalls() as again:
        for value in range(10):
            twice(value)
    assert again.calls == probe.calls  # deterministic: the same code makes the same calls
