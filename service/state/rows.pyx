"""A table's rows taken and written by slot in compiled loops: a run's gathers and scatters.

numpy's fancy indexing of a 2-D array (``table[slots]``, ``table[slots] = rows``) costs
1.5-7 µs per call, most of it dispatch, several times per run; these copy each row
with one memcpy (``timeit``: 0.6-3.6 µs). numpy's 1-D fancy indexing is cheaper than
a call here, so the counters' columns keep it. Slots are distinct where rows are
written (one event per session per run).
"""

from libc.stdint cimport int64_t
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
