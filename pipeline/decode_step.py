"""The rolling decoder's sequential greedy step: one token per stream, as a dynamic batch or in static shapes.

After the parallel pass of an update, streams still generating forward one token each, about 9 times per
update. A step is tiny (one row per stream) and reads every decoder weight, so it is weight-bandwidth bound,
and on a GPU also launch bound: 28 layers of a dozen kernels, each a few microseconds of work. Two ways to run it,
the same numbers (the tests hold them together):

* `DynamicDecodeStep`: `forward_padded` on exactly the streams that step (a padded batch over their real
  cache lengths). Fewest FLOPs; the default on CPU.
* `StaticDecodeStep`: the first `rows` slots of the decoder pool as one fixed-shape batch attending over the
  first `span` columns, both rounded up to buckets (rows 1, 2, 4, 8, ...; span 64, 128, 256, capacity). Row r
  is slot r. A stepping stream writes its new K/V at its cache length; every other row (a slot that is idle this
  step or has no stream) writes to the pool's scratch column, which no stream owns and no span reaches. Query
  positions and the mask derive from that write column, so shapes and tensor addresses never change: inputs
  are copied into persistent buffers and the logits land in one. That is what a CUDA graph needs: with
  `cuda_graphs=True` every (rows, span) shape is captured when the step is built, and each step is one graph
  replay. Padding rows cost little in a bandwidth-bound step; the engine hands out the lowest free slot first,
  so the live slots stay packed at the start of the pool.

Both advance each stepped cache by one position and return logits [streams, vocab] in the callers' order.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial
from typing import Protocol

import torch
from torch import Tensor

from pipeline.decoder import DecoderKVCache, LayerKV, TextDecoder, forward_padded
from pipeline.device_io import to_device
from pipeline.kv_pool import DecoderKVPool

log = logging.getLogger(__name__)


class DecodeStep(Protocol):
    """Forward `token_ids[i]` on top of `caches[i]` for every i; append its K/V; return logits [len(caches), vocab]."""

    def __call__(self, caches: Sequence[DecoderKVCache], token_ids: Sequence[int]) -> Tensor: ...


class DynamicDecodeStep:
    """A padded batch of exactly the stepping streams (`forward_padded`), then their logits."""

    def __init__(self, decoder: TextDecoder) -> None:
        self.decoder = decoder

    def __call__(self, caches: Sequence[DecoderKVCache], token_ids: Sequence[int]) -> Tensor:
        embeds = self.decoder.embed(to_device(list(token_ids), self.decoder.embed_tokens.weight.device))
        hidden = forward_padded(self.decoder, caches, embeds[:, None], [1] * len(caches))
        return self.decoder.logits(hidden[:, 0])


#: The smallest span bucket of a static step: shorter caches attend over this many columns.
SMALLEST_SPAN = 64


def bucket_sizes(limit: int, smallest: int = 1) -> list[int]:
    """Powers of two from `smallest` below `limit`, then `limit`: the fixed sizes a static step runs (and captures)."""
    sizes = [min(smallest, limit)]
    while sizes[-1] * 2 < limit:
        sizes.append(sizes[-1] * 2)
    return sorted({*sizes, limit})


def bucket_for(value: int, buckets: Sequence[int]) -> int:
    """The smallest bucket above `value` (a slot index or a cache length: the bucket holds value + 1 of them)."""
    return next(size for size in buckets if size > value)


class StaticDecodeStep:
    """A fixed-shape step over pool slots [0, rows) attending over columns [0, span); optionally CUDA graphs.

    Both sizes are bucketed: `rows` covers the highest stepping slot, `span` the longest stepping stream (+1).
    Bounding the span matters at scale: a step reads every attended key of every row, and reading whole slots
    (capacity 475) instead of the ~300 live positions would make K/V, not weights, most of a GPU step's bytes.
    With `cuda_graphs=True` every (rows, span) shape is captured here, at construction, so serving never pays
    for a capture; all graphs share one memory pool and write one logits buffer.
    """

    def __init__(
        self, decoder: TextDecoder, pool: DecoderKVPool, cuda_graphs: bool = False, smallest_span: int = SMALLEST_SPAN
    ) -> None:
        device = pool.keys.device
        if cuda_graphs and device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs the decoder pool on a CUDA device; it is on {device}")
        self.decoder = decoder
        self.pool = pool
        slots = pool.keys.shape[1]
        self.row_buckets = bucket_sizes(slots)
        self.span_buckets = bucket_sizes(pool.capacity, smallest_span)
        # Persistent inputs: what each row forwards and the column it writes its K/V to (rows without a stepping
        # stream write to the scratch column, outside every span); and the output.
        self._token_ids = torch.zeros(slots, dtype=torch.long, device=device)
        self._write_columns = torch.full((slots,), pool.scratch_column, dtype=torch.long, device=device)
        self._key_columns = torch.arange(pool.capacity, device=device)
        weight = decoder.embed_tokens.weight
        self._logits = weight.new_empty(slots, weight.shape[0])
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        if cuda_graphs:
            self._capture_all()

    def __call__(self, caches: Sequence[DecoderKVCache], token_ids: Sequence[int]) -> Tensor:
        slots = [self._slot_of(cache) for cache in caches]
        rows = bucket_for(max(slots), self.row_buckets)
        span = bucket_for(max(cache.length for cache in caches), self.span_buckets)
        device = self._token_ids.device
        index = to_device(slots, device)
        self._write_columns[:rows] = self.pool.scratch_column
        self._write_columns[index] = to_device([cache.length for cache in caches], device)
        self._token_ids[index] = to_device(list(token_ids), device)
        if self._graphs:
            with torch.cuda.device(device):  # replay from any thread, on the pool's device
                self._graphs[rows, span].replay()
        else:
            self._forward(rows, span)
        for cache in caches:
            cache.advance(1)
        return self._logits[index]  # a copy: the buffer is overwritten by the next step

    def _slot_of(self, cache: DecoderKVCache) -> int:
        slot = cache.pool_slot
        if slot is None or slot.keys is not self.pool.keys:
            raise ValueError("a cache outside this step's decoder pool; static steps run only on pooled caches")
        if cache.length >= slot.capacity:
            raise ValueError(f"slot {slot.index} is full ({cache.length} of {slot.capacity} positions)")
        return slot.index

    def _forward(self, rows: int, span: int) -> None:
        """Rows [0, rows): embed, one decoder forward writing K/V in place, logits into the buffer. No host syncs."""
        columns = self._write_columns[:rows]
        embeds = self.decoder.embed(self._token_ids[:rows])[:, None]
        mask = self._key_columns[None, None, :span] <= columns[:, None, None]  # [rows, 1, span]
        output = self.decoder(embeds, columns[:, None], mask, kv_store=partial(self._write, rows, span))
        self.decoder.logits(output.hidden[:, 0], out=self._logits[:rows])

    def _write(self, rows: int, span: int, layer: int, key: Tensor, value: Tensor) -> LayerKV:
        """Scatter each row's new K/V [rows, kv_heads, 1, d] to its write column; attend over columns [0, span)."""
        keys, values = self.pool.keys[layer, :rows], self.pool.values[layer, :rows]
        index = self._write_columns[:rows].view(rows, 1, 1, 1).expand_as(key)
        keys.scatter_(2, index, key)
        values.scatter_(2, index, value)
        return keys[:, :, :span], values[:, :, :span]

    @torch.inference_mode()
    def _capture_all(self) -> None:
        """Record every (rows, span) step into a CUDA graph, largest first (smaller ones reuse its memory)."""
        device = self._token_ids.device
        memory_pool = torch.cuda.graph_pool_handle()
        # Warm-up and capture run with every row on the scratch column, so they write no stream's K/V.
        self._write_columns.fill_(self.pool.scratch_column)
        with torch.cuda.device(device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # lazy kernel/workspace initialisation must happen outside a capture
                self._forward(self.row_buckets[-1], self.span_buckets[-1])
            torch.cuda.current_stream().wait_stream(side)
            for rows in reversed(self.row_buckets):
                for span in reversed(self.span_buckets):
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=memory_pool):
                        self._forward(rows, span)
                    self._graphs[rows, span] = graph
        log.info(
            "captured the decode step as %d CUDA graphs (rows %s x span %s)",
            len(self._graphs), self.row_buckets, self.span_buckets,
        )
