"""Chunks of pooled streams for in-place attention: slot order, a row limit, and a bounded slot range."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pipeline import row_chunks
from pipeline.row_chunks import slot_chunks


def greedy_slot_chunks(slots: list[int], max_rows: int, span: int) -> list[list[int]]:
    """The definition: rows in slot order, a new chunk when the row limit is reached or the next row's slot lies
    `span` or more slots past the chunk's first."""
    chunks: list[list[int]] = []
    for row in sorted(range(len(slots)), key=slots.__getitem__):
        if chunks and len(chunks[-1]) < max_rows and slots[row] - slots[chunks[-1][0]] < span:
            chunks[-1].append(row)
        else:
            chunks.append([row])
    return chunks


@given(
    st.lists(st.integers(0, 300), unique=True, max_size=40),
    st.integers(1, 12),
    st.integers(1, 50),
    st.integers(1, 40),
)
def test_slot_chunks_are_the_greedy_chunks_of_bounded_rows_and_range(
    slots: list[int], max_rows: int, bytes_per_row: int, bytes_per_range_row: int
) -> None:
    span = max(max_rows, max(row_chunks.CHUNK_BYTES, max_rows * bytes_per_row) // bytes_per_range_row)
    chunks = slot_chunks(slots, max_rows, bytes_per_row, bytes_per_range_row)
    assert [chunk.tolist() for chunk in chunks] == greedy_slot_chunks(slots, max_rows, span)


def test_a_chunk_stops_at_a_gap_its_budget_cannot_hold(monkeypatch) -> None:
    """Three neighbouring slots and one far away: the far one would make the range 61 rows, over a budget of 10
    range rows, so it is a chunk of its own; with room for the gap, one chunk."""
    monkeypatch.setattr(row_chunks, "CHUNK_BYTES", 100)
    slots = [60, 1, 0, 2]
    assert [chunk.tolist() for chunk in slot_chunks(slots, 8, 1, 10)] == [[2, 1, 3], [0]]
    assert [chunk.tolist() for chunk in slot_chunks(slots, 8, 1, 1)] == [[2, 1, 3, 0]]


def test_slot_chunks_refuse_an_empty_row_limit_and_take_rows_of_no_width() -> None:
    with pytest.raises(ValueError, match="max_rows=0"):
        slot_chunks([0], 0, 1, 1)
    assert [chunk.tolist() for chunk in slot_chunks([5, 0, 9], 2, 0, 0)] == [[1, 0], [2]]


def test_a_forward_across_a_wide_slot_gap_runs_in_two_chunks_with_the_same_results(monkeypatch) -> None:
    """Streams in slots 0, 1 and 40 of a pool: with a budget that holds the three streams but not the 41-row
    range, the far stream runs in a chunk of its own (the range rows computed: 2 + 1, not 41), results equal to
    one batch over the whole range."""
    import pipeline.decoder as decoder_module
    from pipeline.decoder import forward_streams
    from pipeline.kv_pool import DecoderKVPool
    from tests.test_decoder import random_decoder

    decoder = random_decoder(seed=7)
    lengths = [5, 9, 3]
    generator = torch.Generator().manual_seed(8)
    inputs = [torch.randn(n, decoder.config.hidden_size, generator=generator) for n in lengths]
    placed = decoder_module._PoolRows.placed
    results = {}
    for name, chunk_bytes in (("one range", 2**40), ("cut at the gap", None)):
        per_stream = decoder_module._bytes_per_stream(decoder, width=9, keys=2 * 9)
        per_range_row = decoder_module._bytes_per_range_row(decoder, width=9, keys=2 * 9)
        # Room for the three streams (and then some), not for 41 range rows.
        monkeypatch.setattr(row_chunks, "CHUNK_BYTES", chunk_bytes or max(4 * per_stream, 20 * per_range_row))
        pool = DecoderKVPool(decoder, slots=41, capacity=40)
        caches = [pool.new_cache(slot) for slot in (1, 40, 0)]
        ranges: list[int] = []

        def recorded(self, *args):  # noqa: ANN001, ANN202
            result = placed(self, *args)
            ranges.append(result.count)
            return result

        monkeypatch.setattr(decoder_module._PoolRows, "placed", recorded)
        with torch.no_grad():
            forward_streams(decoder, caches, inputs)  # a first update on empty caches
            ranges.clear()
            results[name] = forward_streams(decoder, caches, inputs)
        results[name + " ranges"] = ranges
    assert results["one range ranges"] == [41]
    assert results["cut at the gap ranges"] == [2, 1]
    for got, want in zip(results["cut at the gap"], results["one range"]):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
