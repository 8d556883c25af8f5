"""The serving processes' host policy: Python's collector and glibc's allocator, settled and back."""

from __future__ import annotations

import ctypes.util
import gc
import resource

import pytest
import torch

from pipeline.host_policy import DEFAULT_GC_THRESHOLDS, POLICIES, YOUNG_GENERATION_THRESHOLD

GLIBC = hasattr(ctypes.CDLL(ctypes.util.find_library("c") or None), "gnu_get_libc_version")


@pytest.fixture
def settled():
    POLICIES["settled"]()
    yield
    POLICIES["default"]()
    assert gc.get_threshold() == DEFAULT_GC_THRESHOLDS and gc.get_freeze_count() == 0


def test_the_settled_collector_freezes_what_lives_now_and_still_collects_later_cycles() -> None:
    kept_for_life = [object()]
    POLICIES["settled"]()
    try:
        assert gc.get_threshold()[0] == YOUNG_GENERATION_THRESHOLD
        assert gc.get_freeze_count() > 0
        assert all(tracked is not kept_for_life for tracked in gc.get_objects())  # frozen: out of the collector's sight
        cycle: list = []
        cycle.append(cycle)
        assert gc.is_tracked(cycle)
        del cycle
        assert gc.collect() >= 1  # a cycle made after settling is still found
    finally:
        POLICIES["default"]()
    assert gc.get_threshold() == DEFAULT_GC_THRESHOLDS
    assert gc.get_freeze_count() == 0


@pytest.mark.skipif(not GLIBC, reason="the allocator setting is glibc's mallopt")
def test_settled_a_steps_freed_activations_are_reused_without_new_page_faults(settled) -> None:
    """20 activations of 4 MiB, each freed before the next: fresh pages each time would be about 20,000 faults."""
    x = torch.ones(2**20)
    for _ in range(3):  # the heap grows once
        y = x * 2
        del y
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        y = x * 2
        del y
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < 500
