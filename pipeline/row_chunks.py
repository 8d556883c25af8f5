"""The one bound on a step's batch-wide intermediates, and the row chunks that keep to it.

An engine step runs hundreds of streams' blocks as one batch, and an intermediate over the whole batch (the conv
stem's first feature map, attention scores, MLP activations, logits) grows with it: at a thousand streams it can
take more memory than the streams' K/V slots themselves. Operations whose rows are independent (pieces, streams,
positions) therefore run in chunks of rows whose intermediates stay within `CHUNK_BYTES`, results written into
one output. Each row goes through the same arithmetic in a chunk as in the whole batch, so chunking changes no
value (the tests compare bitwise where the kernels allow).

A chunk that re-reads a weight (the logits' output matrix) may be as large as that weight instead, so that the
re-reading never costs more memory traffic than the activations themselves (`rows_per_chunk(..., reread_bytes)`).
The decoder's forward (`forward_padded`) and the encoder pool's layers (`EncoderKVPool.encode_blocks`) run whole
in chunks of streams this way, each chunk re-reading every layer's weights (`weight_bytes`): at full size a chunk
is hundreds of streams, so the kernels stay large; on the tiny checkpoint it is tens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from torch import Tensor, nn

#: Most bytes of intermediates that a chunk of a batch-wide operation holds at once. Small next to one stream's
#: K/V slots times a batch (0.5 MB per stream even at the tiny checkpoint), large enough that a chunk still keeps
#: the kernels busy (thousands of rows of a small layer, tens of rows of a full-size one).
CHUNK_BYTES = 4 * 2**20


def rows_per_chunk(bytes_per_row: int, reread_bytes: int = 0) -> int:
    """Rows of a batch whose intermediates (`bytes_per_row` each) fit `CHUNK_BYTES`, or `reread_bytes` when a chunk
    re-reads a weight that large (see the module docstring); at least one."""
    if bytes_per_row <= 0:
        raise ValueError(f"bytes_per_row={bytes_per_row}; expected a positive size")
    return max(1, max(CHUNK_BYTES, reread_bytes) // bytes_per_row)


def weight_bytes(module: nn.Module) -> int:
    """The bytes of a module's parameters: what a chunk that runs it re-reads, whatever the chunk's size."""
    return sum(parameter.numel() * parameter.element_size() for parameter in module.parameters())


def rows_per_forward_chunk(bytes_per_row: int, rows: int, weights: nn.Module) -> int:
    """Rows per chunk of a whole forward through `weights` over `rows` independent rows (streams), each chunk
    re-reading the weights, so that a chunk may be as large as they are. A batch within `CHUNK_BYTES` is one chunk
    without the weights being counted: that walk over every parameter (0.4 ms for the full-size decoder's layers)
    would otherwise run in every decode step."""
    if bytes_per_row * rows <= CHUNK_BYTES:
        return rows
    return rows_per_chunk(bytes_per_row, reread_bytes=weight_bytes(weights))


def consecutive_runs(sizes: Sequence[int], limit: int) -> list[range]:
    """Items (in order) grouped into runs whose sizes add up to at most `limit`, for chunks that must not split an
    item (a stream's rows); an item larger than `limit` is a run of its own."""
    runs: list[range] = []
    start, total = 0, 0
    for index, size in enumerate(sizes):
        if index > start and total + size > limit:
            runs.append(range(start, index))
            start, total = index, 0
        total += size
    if sizes:
        runs.append(range(start, len(sizes)))
    return runs


def slot_chunks(
    slots: Sequence[int], max_rows: int, bytes_per_row: int, bytes_per_range_row: int
) -> list[np.ndarray]:
    """Rows (indices into `slots`) in slot order, in chunks of at most `max_rows` rows, for a forward that attends
    over each chunk's slot range of a pool in place. Every slot of that range is a row of the attention, whether a
    stream of the chunk lives there or not (`pipeline.decoder.attention`), holding `bytes_per_range_row`; a chunk
    across a wide gap in the slots would compute the gap and hold it in memory. So a chunk's range is kept within
    the chunk's own budget (`max_rows` rows of `bytes_per_row`, or `CHUNK_BYTES`); O(chunks) Python steps."""
    if max_rows <= 0:
        raise ValueError(f"max_rows={max_rows}; expected a positive number of rows")
    span = max(max_rows, max(CHUNK_BYTES, max_rows * bytes_per_row) // max(1, bytes_per_range_row))
    slots = np.asarray(slots, dtype=np.int64)
    order = np.argsort(slots, kind="stable")
    in_order = slots[order]
    chunks: list[np.ndarray] = []
    start = 0
    while start < order.size:
        end = min(start + max_rows, int(np.searchsorted(in_order, in_order[start] + span)))
        chunks.append(order[start:end])
        start = end
    return chunks


def in_row_chunks(function: Callable[..., Tensor], bytes_per_row: int, *inputs: Tensor) -> Tensor:
    """function(*inputs) for inputs whose rows (dim 0) are independent, run on chunks of rows within `CHUNK_BYTES`.

    Each chunk's result is written into one output tensor as it comes, so the step holds the output and one
    chunk's intermediates, never every chunk's at once. One chunk is a plain call.
    """
    rows = inputs[0].shape[0]
    step = rows_per_chunk(bytes_per_row)
    if step >= rows:
        return function(*inputs)
    output: Tensor | None = None
    for start in range(0, rows, step):
        result = function(*(tensor[start : start + step] for tensor in inputs))
        if output is None:
            output = result.new_empty(rows, *result.shape[1:])
        output[start : start + step] = result
    return output
