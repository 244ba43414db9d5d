"""Counting loops of the hot path, compiled: pending events per table row, histogram buckets."""

from libc.stdint cimport int32_t, int64_t, uint8_t

import numpy as np


def add_at(int32_t[::1] counts, const int64_t[::1] rows, int32_t delta):
    """``counts[row] += delta`` for each of ``rows``, a row as often as it is listed."""
    cdef Py_ssize_t i
    for i in range(rows.shape[0]):
        counts[rows[i]] += delta


def add_elapsed(
    int64_t[::1] counts, const double[::1] bounds, double now, const double[::1] starts
):
    """Count the time from each of ``starts`` to ``now`` in its "le" bucket (``counts``
    has one more cell than ``bounds``: the +Inf bucket); the times' sum."""
    cdef Py_ssize_t i, lo, hi, mid, n = bounds.shape[0]
    cdef double v, total = 0.0
    for i in range(starts.shape[0]):
        v = now - starts[i]
        lo = 0
        hi = n
        while lo < hi:  # the first bound >= v (a value equal to a bound is in its bucket)
            mid = (lo + hi) >> 1
            if bounds[mid] < v:
                lo = mid + 1
            else:
                hi = mid
        counts[lo] += 1
        total += v
    return total


def any_nonzero(object array):
    """Whether a 1-D contiguous array (uint64 seqs, bool resets) holds a nonzero element."""
    cdef const uint8_t[::1] raw = array.view(np.uint8)
    cdef Py_ssize_t i
    for i in range(raw.shape[0]):
        if raw[i]:
            return True
    return False
