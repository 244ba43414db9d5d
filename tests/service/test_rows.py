"""A table's compiled gathers and scatters against numpy's fancy indexing."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.state.rows import put_rows, take_rows


@given(st.integers(1, 9), st.integers(0, 7), st.data())
def test_take_and_put_rows_are_numpys_fancy_indexing(
    width: int, rows: int, data: st.DataObject
) -> None:
    rng = np.random.default_rng(rows * 10 + width)
    table = rng.standard_normal((rows + 3, width)).astype(np.float32)
    slots = np.array(
        data.draw(st.lists(st.integers(0, rows + 2), max_size=rows + 3, unique=True)), np.int64
    )
    got = take_rows(table, slots)
    assert got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_array_equal(got, table[slots])
    new = rng.standard_normal((slots.size, width)).astype(np.float32)
    expected = table.copy()
    expected[slots] = new
    put_rows(table, slots, new)
    np.testing.assert_array_equal(table, expected)


def test_rows_of_another_shape_are_refused_and_nothing_is_written() -> None:
    table = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match="2 x 3 rows for 1 slots of width 3"):
        put_rows(table, np.array([1], np.int64), np.ones((2, 3), np.float32))
    with pytest.raises(ValueError):
        put_rows(table, np.array([1], np.int64), np.ones((1, 3), np.float64))  # not float32
    assert not table.any()
