"""Probes that watch the tensor operations of one engine step (benchmarks run one extra step under each).

* `PeakTensorBytes`: peak bytes of the tensors the step allocates, on any device (the CPU has no allocator
  statistics). An operator output that aliases nothing (not a view, not an in-place or out= result) is a fresh
  allocation, counted until its storage is freed (a finalizer on the storage, whose Python object lives as long
  as the storage). Memory that existed before (weights, K/V pools) is never counted, so the peak is what a step
  needs beyond them. Tensors made outside the dispatcher (`torch.tensor(list)`) are missed: small index tensors.
* `OpClock`: time spent inside tensor operators (kernels on the CPU, plus the C++ dispatch under them), so
  that a step's wall time splits into kernels and host work (Python: scheduling, bookkeeping, the dispatch of
  Python calls). The probe's own overhead (a few microseconds per operator) lands on the host side.
* `PythonCalls`: the Python and C function calls a step makes on the driver's thread (what a profiler counts):
  host work that does not depend on how busy the machine is. On a shared 2-vCPU machine a step's host time
  varies by tens of percent from run to run; its calls are the same, so before and after compare exactly.
* `CollectorClock`: time spent in Python's cyclic garbage collector (any thread), which runs inside whatever
  allocated the object that triggered it, host work or operator.
"""

from __future__ import annotations

import gc
import sys
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class PeakTensorBytes(TorchDispatchMode):
    """`with PeakTensorBytes() as probe: ...`; then `probe.peak` (bytes) of the tensors allocated inside."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        fresh = all(r.alias_info is None for r in returns)
        if fresh:
            for tensor in tree_leaves(out):
                if isinstance(tensor, torch.Tensor):
                    self._count(tensor.untyped_storage())
        return out

    def _count(self, storage: torch.UntypedStorage) -> None:
        key = id(storage)
        if key in self._seen:
            return
        self._seen.add(key)
        size = storage.nbytes()
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, size)

    def _free(self, key: int, size: int) -> None:
        self._seen.discard(key)
        self.live -= size


class OpClock(TorchDispatchMode):
    """`with OpClock() as clock: ...`; then `clock.seconds` spent inside tensor operators, `clock.ops` of them.

    `host_seconds(wall)`: the rest of a probed stretch's wall time, less the probe's own cost per operator
    (measured once per process by timing a mix of small operators with and without the probe)."""

    _overhead_per_op: float | None = None

    def __init__(self) -> None:
        super().__init__()
        self.seconds = 0.0
        self.ops = 0

    def host_seconds(self, wall: float) -> float:
        return wall - self.seconds - self.ops * OpClock.overhead_per_op()

    @classmethod
    def overhead_per_op(cls, trials: int = 500) -> float:
        """The probe's own cost per operator it sees, on a mix like a step's: a composite operator that the probe
        sees decomposed (linear), one with a fresh output (add), a view and an in-place one."""
        if cls._overhead_per_op is None:
            x, w = torch.zeros(4, 8), torch.zeros(8, 8)

            def mix() -> None:
                y = torch.nn.functional.linear(x, w) + x
                y[1:].add_(1)

            with cls():  # the first use of a dispatch mode initialises it
                mix()
            started = time.perf_counter()
            for _ in range(trials):
                mix()
            plain = time.perf_counter() - started
            clock = cls()
            started = time.perf_counter()
            with clock:
                for _ in range(trials):
                    mix()
            probed = time.perf_counter() - started
            cls._overhead_per_op = max(0.0, (probed - plain) / clock.ops)
        return cls._overhead_per_op

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        started = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        self.seconds += time.perf_counter() - started
        self.ops += 1
        return out


class PythonCalls:
    """`with PythonCalls() as probe: ...`; then `probe.calls`: function calls made inside, on this thread (Python
    functions and the C functions Python code calls: builtins, tensor methods). Other threads are not counted
    (the engine's front-end thread: its own stage). Slows the code it watches several times over."""

    def __init__(self) -> None:
        self.calls = 0

    def __enter__(self) -> PythonCalls:
        if sys.getprofile() is not None:
            raise RuntimeError("a profiler is already installed on this thread; PythonCalls would replace it")
        sys.setprofile(self._observe)
        return self

    def __exit__(self, *exc_info: object) -> None:
        sys.setprofile(None)

    def _observe(self, frame: object, event: str, arg: object) -> None:
        if event == "call" or event == "c_call":
            self.calls += 1


class CollectorClock:
    """`with CollectorClock() as clock: ...`; then `clock.seconds` spent in garbage collections, `clock.runs` of
    them, by generation."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.runs = [0, 0, 0]
        self._started = 0.0

    def __enter__(self) -> CollectorClock:
        gc.callbacks.append(self._observe)
        return self

    def __exit__(self, *exc_info: object) -> None:
        gc.callbacks.remove(self._observe)

    def _observe(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._started
            self.runs[info["generation"]] += 1
