"""The ragged index builders equal the Python list comprehensions they replace."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from pipeline.ragged import concat_ranges, padded, ragged_rows

counts_lists = st.lists(st.integers(min_value=0, max_value=6), max_size=12)


@given(st.lists(st.tuples(st.integers(-20, 20), st.integers(-20, 20)), max_size=12))
def test_concat_ranges_is_the_ranges_one_after_another(bounds: list[tuple[int, int]]) -> None:
    starts, stops = [start for start, _ in bounds], [stop for _, stop in bounds]
    result = concat_ranges(starts, stops)
    assert result.dtype == np.int64
    assert result.tolist() == [i for start, stop in bounds for i in range(start, stop)]


@given(counts_lists)
def test_ragged_rows_lists_every_position_row_by_row(counts: list[int]) -> None:
    rows, steps = ragged_rows(counts)
    assert rows.tolist() == [row for row, n in enumerate(counts) for _ in range(n)]
    assert steps.tolist() == [step for n in counts for step in range(n)]


@given(st.lists(st.lists(st.integers(0, 1000), max_size=6), max_size=8), st.integers(0, 3))
def test_padded_left_aligns_each_sequence(sequences: list[list[int]], extra: int) -> None:
    longest = max((len(sequence) for sequence in sequences), default=0)
    for width in (None, longest + extra):
        result = padded(sequences, fill=-1, width=width)
        expected_width = longest if width is None else width
        assert result.shape == (len(sequences), expected_width)
        assert result.tolist() == [[*sequence, *[-1] * (expected_width - len(sequence))] for sequence in sequences]
