"""A table's compiled gathers and scatters against numpy's fancy indexing."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.state.rows import advanced, put_counters, put_rows, take_rows


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


@given(st.integers(0, 7), st.booleans(), st.data())
def test_a_runs_counters_are_numpys(rows: int, sequenced: bool, data: st.DataObject) -> None:
    """``advanced`` and ``put_counters`` against the numpy they replace (uint64 throughout,
    a seq above, at or below the row's last one)."""
    rng = np.random.default_rng(rows + 10 * sequenced)
    step = rng.integers(0, 2**40, rows + 3).astype(np.uint64)
    last_seq = rng.integers(0, 50, rows + 3).astype(np.uint64)
    updated = rng.random(rows + 3)
    slots = np.array(
        data.draw(st.lists(st.integers(0, rows + 2), max_size=rows + 3, unique=True)), np.int64
    )
    seqs = rng.integers(0, 100, slots.size).astype(np.uint64) if sequenced else None
    new_step, new_last = advanced(step, last_seq, slots, seqs)
    assert new_step.dtype == new_last.dtype == np.uint64
    np.testing.assert_array_equal(new_step, step[slots] + np.uint64(1))
    want_last = last_seq[slots] if seqs is None else np.maximum(last_seq[slots], seqs)
    np.testing.assert_array_equal(new_last, want_last)
    expected = [step.copy(), last_seq.copy(), updated.copy()]
    expected[0][slots], expected[1][slots], expected[2][slots] = new_step, new_last, 7.5
    put_counters(step, last_seq, updated, slots, new_step, new_last, 7.5)
    for got, want in zip((step, last_seq, updated), expected):
        np.testing.assert_array_equal(got, want)


def test_counters_for_another_number_of_events_are_refused() -> None:
    step, last_seq = np.zeros(4, np.uint64), np.zeros(4, np.uint64)
    slots = np.array([0, 2], np.int64)
    with pytest.raises(ValueError, match="1 seqs for 2 slots"):
        advanced(step, last_seq, slots, np.ones(1, np.uint64))
    with pytest.raises(ValueError, match="1 steps, 2 seqs for 2 slots"):
        put_counters(
            step, last_seq, np.zeros(4), slots, np.ones(1, np.uint64), np.ones(2, np.uint64), 1.0
        )
    assert not step.any() and not last_seq.any()
