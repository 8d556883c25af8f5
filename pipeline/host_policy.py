"""What a serving process sets for itself so that its host work stays cheap: Python's garbage collector and
glibc's allocator. Process-wide settings, so they are made by the processes that serve (the stage replicas,
`bench engine`), never by the library's classes. Not by the gRPC ingress: there a cancelled call's cleanup waits
for the collector to find the call's cycle, and a rarer young collection delayed it by seconds.

* The collector. CPython runs a collection of its youngest generation every 700 net allocations of container
  objects, of the middle one every tenth of those, and of the whole heap whenever the objects that survived two
  collections grew by a quarter. An engine step for a thousand streams allocates tens of thousands of
  short-lived containers (picks, verdicts, id lists, events) that reference counting frees within the step, so
  at those defaults the collector runs dozens of times per step, promotes temporaries that die moments later,
  and now and then traverses the whole heap (the imported modules, the model's modules, every stream's state:
  some 300,000 objects, 0.1-0.17 s of one core) to find nothing. Settled: what is alive once the process has
  loaded its model is frozen out of the collector's sight (`gc.freeze`) and the youngest generation's threshold
  is `YOUNG_GENERATION_THRESHOLD`, so that a step's temporaries die by reference counting before a collection
  sees them. Cycles are still collected, only looked for less often.
* The allocator. glibc serves a request of more than its mmap threshold (128 KiB at first, then raised to the
  largest block freed, but never past a request of that same size) with fresh pages from the kernel and hands
  them back when the block is freed, so a step's activations of a few MB are faulted in page by page at every
  step: on the CPU that cost 5-7x the arithmetic on them. Settled: blocks up to `MMAP_THRESHOLD_BYTES` come from
  the heap, and up to `TRIM_THRESHOLD_BYTES` of freed heap is kept for the next step instead of being returned
  (the process keeps its high-water mark). Only where the C library is glibc (`mallopt`); elsewhere a no-op.

`default_host_policy()` undoes both as far as the process can (the benchmark measures the two side by side);
measured: `BENCHMARKS.md`, "Run 6" of "A thousand streams in one step".
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging

log = logging.getLogger(__name__)

#: Net container allocations between two collections of the youngest generation in a serving process: more than
#: one step's temporaries at a thousand streams. (CPython's default is `DEFAULT_GC_THRESHOLDS[0]`.)
YOUNG_GENERATION_THRESHOLD = 50_000
#: CPython's own thresholds (young, middle, old).
DEFAULT_GC_THRESHOLDS = (700, 10, 10)

#: Largest block glibc serves from its heap rather than fresh kernel pages: its ceiling on 64-bit systems. A step's
#: batch-wide intermediates stay below it (`pipeline.row_chunks`).
MMAP_THRESHOLD_BYTES = 32 * 2**20
#: Freed heap kept for reuse rather than returned to the kernel.
TRIM_THRESHOLD_BYTES = 2**30
#: glibc's initial values of both (its dynamic adjustment of them does not come back once they are set).
DEFAULT_MALLOC_THRESHOLD_BYTES = 128 * 2**10

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)


def settle_host() -> None:
    """The serving settings (the module docstring says why). Call it once the process has loaded its model."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_GENERATION_THRESHOLD, middle, old)
    kept = _set_malloc_thresholds(MMAP_THRESHOLD_BYTES, TRIM_THRESHOLD_BYTES)
    log.info(
        "host settled: %d objects frozen, young GC threshold %d, freed memory %s",
        gc.get_freeze_count(),
        YOUNG_GENERATION_THRESHOLD,
        "kept for reuse" if kept else "as the C library does (not glibc)",
    )


def default_host_policy() -> None:
    """CPython's collector (nothing frozen, `DEFAULT_GC_THRESHOLDS`) and glibc's initial thresholds."""
    gc.unfreeze()
    gc.set_threshold(*DEFAULT_GC_THRESHOLDS)
    _set_malloc_thresholds(DEFAULT_MALLOC_THRESHOLD_BYTES, DEFAULT_MALLOC_THRESHOLD_BYTES)


def _set_malloc_thresholds(mmap_bytes: int, trim_bytes: int) -> bool:
    """glibc's `mallopt` for both thresholds; False where the C library is not glibc."""
    path = ctypes.util.find_library("c")
    libc = ctypes.CDLL(path) if path else None
    if libc is None or not hasattr(libc, "gnu_get_libc_version"):
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_bytes)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, trim_bytes))


#: The policies by name (`bench engine --host-policy`).
POLICIES = {"default": default_host_policy, "settled": settle_host}
