"""Python's cyclic garbage collector in a process that holds thousands of streams.

CPython runs a collection of its youngest generation every 700 net allocations of container objects, of the
middle one every tenth of those, and of the whole heap whenever the objects that survived two collections grew
by a quarter. An engine step for a thousand streams allocates tens of thousands of short-lived containers (picks,
verdicts, id lists, events) that reference counting frees within the step, so at those defaults the collector
runs dozens of times per step, promotes temporaries that die moments later, and now and then traverses the whole
heap (the imported modules, the model's modules, every stream's state: some 300,000 objects, about 0.1-0.17 s of
one core) to find nothing (measured here: `BENCHMARKS.md`, "Python's garbage collector").

`settle_garbage_collector()`, called once a serving process holds what it keeps for its life (imports, model),
freezes those objects out of the collector's sight (`gc.freeze`) and raises the youngest generation's threshold
to `YOUNG_GENERATION_THRESHOLD`, so that a step's temporaries die by reference counting before a collection sees
them. Cycles are still collected, only looked for less often; `default_garbage_collector()` undoes both (the
benchmark measures the two side by side).
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger(__name__)

#: Net container allocations between two collections of the youngest generation in a serving process: more than
#: one step's temporaries at a thousand streams. (CPython's default is `DEFAULT_THRESHOLDS[0]`.)
YOUNG_GENERATION_THRESHOLD = 50_000

#: CPython's own thresholds (young, middle, old), restored by `default_garbage_collector`.
DEFAULT_THRESHOLDS = (700, 10, 10)


def settle_garbage_collector() -> None:
    """Collect once, freeze every object alive now out of the collector's sight, and raise the youngest
    generation's threshold (the module docstring says why). Call it after the process has loaded its model."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_GENERATION_THRESHOLD, middle, old)
    frozen = gc.get_freeze_count()
    log.info("garbage collector settled: %d objects frozen, young threshold %d", frozen, YOUNG_GENERATION_THRESHOLD)


def default_garbage_collector() -> None:
    """CPython's defaults again: nothing frozen, `DEFAULT_THRESHOLDS`."""
    gc.unfreeze()
    gc.set_threshold(*DEFAULT_THRESHOLDS)


#: The policies by name (`bench engine --gc`).
POLICIES = {"default": default_garbage_collector, "settled": settle_garbage_collector}
