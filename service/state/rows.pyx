"""A table's rows taken and written by slot in compiled loops: a run's gathers and scatters.

numpy's fancy indexing of a 2-D array (``table[slots]``, ``table[slots] = rows``) costs
1.5-7 µs per call, most of it dispatch, several times per run; these copy each row
with one memcpy (``timeit``: 0.6-3.6 µs). A run's counters (``step``, ``last_seq``,
``updated``) are read and written in one call each, where numpy took three or four
1-D operations (a single one of those is cheaper than a call here, so other 1-D
columns keep numpy's indexing). Slots are distinct where rows are written (one event
per session per run).
"""

from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memcpy

import numpy as np


def take_rows(const float[:, ::1] table, const int64_t[::1] slots):
    """``table[slots]``: a new ``[n, k]`` float32 array."""
    cdef Py_ssize_t n = slots.shape[0], k = table.shape[1], i
    out = np.empty((n, k), np.float32)
    if n == 0 or k == 0:
        return out
    cdef float[:, ::1] rows = out
    for i in range(n):
        memcpy(&rows[i, 0], &table[slots[i], 0], k * sizeof(float))
    return out


def put_rows(float[:, ::1] table, const int64_t[::1] slots, const float[:, ::1] rows):
    """``table[slots] = rows``."""
    cdef Py_ssize_t n = slots.shape[0], k = table.shape[1], i
    if rows.shape[0] != n or rows.shape[1] != k:
        raise ValueError(f"{rows.shape[0]} x {rows.shape[1]} rows for {n} slots of width {k}")
    if k == 0:
        return
    for i in range(n):
        memcpy(&table[slots[i], 0], &rows[i, 0], k * sizeof(float))


def advanced(
    const uint64_t[::1] step, const uint64_t[::1] last_seq, const int64_t[::1] slots, seqs
):
    """The rows' ``step`` and ``last_seq`` once a run of one event each is applied:
    ``step + 1``, and the greater of ``last_seq`` and the event's seq (``seqs`` None:
    no event has one). Two new uint64 arrays."""
    cdef Py_ssize_t n = slots.shape[0], i
    new_step = np.empty(n, np.uint64)
    new_last = np.empty(n, np.uint64)
    cdef uint64_t[::1] steps = new_step, lasts = new_last
    cdef const uint64_t[::1] given
    cdef uint64_t last
    if seqs is None:
        for i in range(n):
            steps[i] = step[slots[i]] + 1
            lasts[i] = last_seq[slots[i]]
    else:
        given = seqs
        if given.shape[0] != n:
            raise ValueError(f"{given.shape[0]} seqs for {n} slots")
        for i in range(n):
            steps[i] = step[slots[i]] + 1
            last = last_seq[slots[i]]
            lasts[i] = given[i] if given[i] > last else last
    return new_step, new_last


def put_counters(
    uint64_t[::1] step,
    uint64_t[::1] last_seq,
    double[::1] updated,
    const int64_t[::1] slots,
    const uint64_t[::1] new_step,
    const uint64_t[::1] new_last,
    double now,
):
    """``step[slots] = new_step``, ``last_seq[slots] = new_last``, ``updated[slots] = now``."""
    cdef Py_ssize_t n = slots.shape[0], i
    if new_step.shape[0] != n or new_last.shape[0] != n:
        raise ValueError(f"{new_step.shape[0]} steps, {new_last.shape[0]} seqs for {n} slots")
    for i in range(n):
        step[slots[i]] = new_step[i]
        last_seq[slots[i]] = new_last[i]
        updated[slots[i]] = now
