"""Host <-> device transfers of a step, without hidden synchronisation.

An engine step for a thousand streams must not wait for the device more than it has to: every blocking copy
(a `.tolist()`, `int(tensor)`, `torch.tensor(values, device="cuda")` from pageable memory) stalls the host until
the queued kernels are done, and the host then has nothing queued while it prepares the next ones.

* `to_device`: host integers (ids, lengths, indices; a list or an int64 array) to the device with an asynchronous
  copy, ordered on the current stream like a kernel; on the CPU the tensor itself.
* `read_to_host`: THE read of a step's results (the picked tokens of a sequential decode step, the verdicts of a
  verification). The only sanctioned synchronisation: it is counted (`host_reads`), and it is allowed under
  `torch.cuda.set_sync_debug_mode("error")`, which a CUDA test sets to prove that a step synchronises nowhere
  else.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor

_reads = threading.local()


def to_device(values: Sequence[int] | np.ndarray, device: torch.device) -> Tensor:
    """Integer `values` (ids, lengths, indices) as an int64 tensor on `device` (an array keeps its shape), without
    blocking the host."""
    # Through numpy: a list converts 3x faster than with `torch.tensor`, and an int64 array is taken as it is.
    host = torch.from_numpy(np.asarray(values, dtype=np.int64))
    # An asynchronous copy from pageable memory is staged by the driver before the call returns (so `host` may go),
    # and is ordered on the current stream: no synchronisation, unlike a blocking copy.
    return host if device.type == "cpu" else host.to(device, non_blocking=True)


def read_to_host(tensor: Tensor) -> Any:
    """`tensor.tolist()`: the one synchronising read of a step (counted; allowed in sync-debug "error" mode)."""
    _reads.count = getattr(_reads, "count", 0) + 1
    if not tensor.is_cuda:
        return tensor.tolist()
    with _sync_allowed():
        return tensor.tolist()


def host_reads() -> int:
    """Reads made by `read_to_host` on this thread so far (a step's count is the difference across it)."""
    return getattr(_reads, "count", 0)


@contextmanager
def _sync_allowed():
    mode = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(mode)
