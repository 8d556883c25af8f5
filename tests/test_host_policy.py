"""The serving processes' host policy: Python's collector and glibc's allocator, settled and back."""

from __future__ import annotations

import ctypes.util
import gc
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.host_policy import DEFAULT_GC_THRESHOLDS, POLICIES, YOUNG_GENERATION_THRESHOLD

REPO = Path(__file__).resolve().parent.parent
GLIBC = hasattr(ctypes.CDLL(ctypes.util.find_library("c") or None), "gnu_get_libc_version")


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


_WHERE_A_BLOCK_LIVES = """
import ctypes, sys
import torch
from pipeline.host_policy import POLICIES
POLICIES[sys.argv[1]]()
libc = ctypes.CDLL(None)
libc.sbrk.restype = ctypes.c_void_p
block = torch.empty(30 * 2**20, dtype=torch.uint8)  # an activation of 30 MiB
print("heap" if block.data_ptr() < libc.sbrk(0) else "mapped")
"""


@pytest.mark.skipif(not GLIBC, reason="the allocator setting is glibc's mallopt")
def test_settled_a_steps_activations_come_from_the_heap_not_fresh_kernel_pages() -> None:
    """In a fresh process, a 30 MiB block is mapped from the kernel under glibc's defaults (and unmapped when freed,
    so the next one faults in fresh pages); settled, it comes from the heap, which keeps freed blocks for reuse."""
    where = {}
    for policy in POLICIES:
        done = subprocess.run(
            [sys.executable, "-c", _WHERE_A_BLOCK_LIVES, policy], cwd=REPO, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        where[policy] = done.stdout.strip()
    assert where == {"default": "mapped", "settled": "heap"}
