"""The compiled loops of admission, the pool and the counters, against plain numpy/Python."""

from __future__ import annotations

import asyncio
from bisect import bisect_left
from itertools import groupby

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.core.scan import first_per_row, job_counts, join_rows, scan, split_rows, stretches
from service.core.types import EventBlock, Job
from service.counts import add_at, add_elapsed, any_nonzero


@given(st.lists(st.integers(0, 9), max_size=40))
def test_job_counts_count_each_job(jobs: list[int]) -> None:
    got = job_counts(np.array(jobs, np.int64))
    done, counts = np.unique(np.array(jobs, np.int64), return_counts=True)
    assert got == list(zip(done.tolist(), counts.tolist()))


@given(st.lists(st.integers(0, 3), max_size=40))
def test_stretches_list_every_stretch_of_a_key_even_when_it_comes_back(keys: list[int]) -> None:
    got = stretches(np.array(keys, np.int64))
    expected, start = [], 0
    for key, group in groupby(keys):
        end = start + len(list(group))
        expected.append((key, start, end))
        start = end
    assert got == expected
    assert stretches(np.array([7, 5, 7], np.int64)) == [(7, 0, 1), (5, 1, 2), (7, 2, 3)]


@given(st.lists(st.integers(0, 15), max_size=40), st.integers(1, 50))
def test_first_per_row_picks_the_first_event_of_each_row(slots: list[int], most: int) -> None:
    marks = np.full(16, -1, np.int64)
    got = first_per_row(np.array(slots, np.int64), most, marks)
    seen: set[int] = set()
    expected = []
    for i, slot in enumerate(slots):
        if slot not in seen:
            seen.add(slot)
            expected.append(i)
    assert got.tolist() == expected[:most]
    assert (marks == -1).all()  # ready for the next pick


def _pool_columns(rng: np.random.Generator, n: int, width: int) -> dict[str, np.ndarray]:
    """Columns of every kind a pool holds: int64, [n, E] float32, uint64, bool, float64."""
    return {
        "slots": rng.integers(0, 99, n).astype(np.int64),
        "values": rng.standard_normal((n, width)).astype(np.float32),
        "seqs": rng.integers(0, 2**63, n).astype(np.uint64),
        "resets": rng.random(n) < 0.5,
        "t0": rng.random(n),
    }


@given(st.integers(0, 30), st.integers(0, 5), st.data())
def test_split_rows_is_numpys_fancy_indexing_and_its_complement(
    n: int, width: int, data: st.DataObject
) -> None:
    columns = _pool_columns(np.random.default_rng(n * 7 + width), n, width)
    mask = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    picked = np.flatnonzero(np.array(mask, np.bool_)).astype(np.int64)
    taken, kept = split_rows(columns, picked, n)
    keep = np.ones(n, np.bool_)
    keep[picked] = False
    for name, column in columns.items():
        assert taken[name].dtype == column.dtype and kept[name].dtype == column.dtype
        np.testing.assert_array_equal(taken[name], column[picked])
        np.testing.assert_array_equal(kept[name], column[keep])


@given(st.integers(0, 12), st.integers(0, 12), st.integers(0, 4))
def test_join_rows_is_numpys_concatenate(a: int, b: int, width: int) -> None:
    rng = np.random.default_rng(a * 100 + b * 10 + width)
    first, second = _pool_columns(rng, a, width), _pool_columns(rng, b, width)
    joined = join_rows(first, second, tuple(first))
    for name in first:
        expected = np.concatenate((first[name], second[name]))
        assert joined[name].dtype == expected.dtype
        np.testing.assert_array_equal(joined[name], expected)


def test_split_and_join_refuse_what_they_cannot_copy() -> None:
    columns = _pool_columns(np.random.default_rng(0), 4, 2)
    for picked in ([2, 1], [1, 1], [4], [-1]):
        with pytest.raises(IndexError, match="sorted, distinct and below 4"):
            split_rows(columns, np.array(picked, np.int64), 4)
    with pytest.raises(ValueError, match="has 4 rows, not 5"):
        split_rows(columns, np.array([0], np.int64), 5)
    other = dict(columns, values=columns["values"].astype(np.float64))
    with pytest.raises(ValueError, match="column 'values'"):
        join_rows(columns, other, tuple(columns))


@given(
    st.lists(st.integers(0, 5), min_size=1, max_size=4),
    st.data(),
)
@settings(max_examples=100, deadline=None)
def test_scan_joins_the_requests_and_finds_rows_and_bad_values(
    sizes: list[int], data: st.DataObject
) -> None:
    e = 3
    index = {"known-0": 4, "known-1": 9}
    loop = asyncio.new_event_loop()
    jobs, all_ids, all_values, all_seqs, all_resets, all_t0 = [], [], [], [], [], []
    try:
        for j, n in enumerate(sizes):
            ids = data.draw(
                st.lists(st.sampled_from(["known-0", "known-1", "new"]), min_size=n, max_size=n)
            )
            values = np.array(
                data.draw(
                    st.lists(
                        st.lists(
                            st.sampled_from([0.5, -1.0, np.nan, np.inf]), min_size=e, max_size=e
                        ),
                        min_size=n,
                        max_size=n,
                    )
                ),
                np.float32,
            ).reshape(n, e)
            seqs = data.draw(st.none() | st.lists(st.integers(0, 9), min_size=n, max_size=n))
            resets = data.draw(st.none() | st.lists(st.booleans(), min_size=n, max_size=n))
            block = EventBlock(
                ids,
                values,
                None if seqs is None else np.array(seqs, np.uint64),
                None if resets is None else np.array(resets, np.bool_),
                {0: "bad"} if n and j == 1 else None,
            )
            job = Job(block, False, loop.create_future(), "m", version=j if j == 2 else 0)
            jobs.append(job)
            all_ids += ids
            all_values.append(values)
            all_seqs += seqs or [0] * n
            all_resets += resets or [False] * n
            all_t0 += [job.t0] * n
        found = scan(jobs, index, e)
    finally:
        loop.close()
    values = np.concatenate(all_values)
    assert found.session_ids == all_ids
    np.testing.assert_array_equal(found.values, values)
    assert found.seqs.tolist() == all_seqs and found.resets.tolist() == all_resets
    assert found.t0.tolist() == all_t0
    assert found.job_of.tolist() == [j for j, n in enumerate(sizes) for _ in range(n)]
    assert found.slots.tolist() == [index.get(i, -1) for i in all_ids]
    assert found.unknown == all_ids.count("new")
    bad_rows = np.flatnonzero(~np.isfinite(values).all(axis=1)).tolist()
    assert (found.not_finite or []) == bad_rows
    assert found.bad == (len(sizes) > 1 and sizes[1] > 0)
    assert found.asked == (len(sizes) > 2)


@given(st.lists(st.floats(0, 10) | st.sampled_from([0.1, 1.0, 2.5]), max_size=30))
def test_buckets_count_as_bisect_does(values: list[float]) -> None:
    bounds = np.array([0.1, 1.0, 2.5], np.float64)
    counts = np.zeros(4, np.int64)
    # From -v to 0 is exactly v in floating point: values on a bound stay on it.
    total = add_elapsed(counts, bounds, 0.0, -np.array(values, np.float64))
    expected = [0] * 4
    for v in values:
        expected[bisect_left(bounds.tolist(), v)] += 1
    assert counts.tolist() == expected
    assert total == sum(values) or abs(total - sum(values)) < 1e-9


def test_add_at_counts_repeated_rows_and_any_nonzero_sees_any_byte() -> None:
    counts = np.zeros(5, np.int32)
    add_at(counts, np.array([1, 3, 1, 1], np.int64), 1)
    add_at(counts, np.array([3], np.int64), -1)
    assert counts.tolist() == [0, 3, 0, 0, 0]
    assert not any_nonzero(np.zeros(4, np.uint64))
    assert any_nonzero(np.array([0, 0, 2**63], np.uint64))
    assert any_nonzero(np.array([False, True]))
    assert not any_nonzero(np.zeros(0, np.bool_))
