"""Counting loops of the hot path, compiled: pending events per table row, histogram buckets."""

cimport numpy as cnp
from libc.stdint cimport int32_t, int64_t, uint8_t

from service.arrays cimport dim0, f64, first_outside, flags, i32_out, i64, i64_out, u64

cnp.import_array()


def add_at(object counts, object rows, int32_t delta):
    """``counts[row] += delta`` for each of ``rows``, a row as often as it is listed."""
    cdef int32_t* cells = i32_out(counts)
    cdef const int64_t* at = i64(rows)
    cdef Py_ssize_t i, n = dim0(rows), size = dim0(counts)
    cdef Py_ssize_t bad = first_outside(at, n, size)  # every row, before any is counted
    if bad >= 0:
        raise IndexError(f"row {at[bad]} outside {size} counts")
    for i in range(n):
        cells[at[i]] += delta


def add_elapsed(object counts, object bounds, double now, object starts):
    """Count the time from each of ``starts`` to ``now`` in its "le" bucket (``counts``
    has one more cell than ``bounds``: the +Inf bucket); the times' sum."""
    cdef int64_t* cells = i64_out(counts)
    cdef const double* edges = f64(bounds)
    cdef const double* began = f64(starts)
    cdef Py_ssize_t i, lo, hi, mid, n = dim0(bounds)
    if dim0(counts) != n + 1:
        raise ValueError(f"{dim0(counts)} counts for {n} bounds (one more is the +Inf bucket)")
    cdef double v, total = 0.0
    for i in range(dim0(starts)):
        v = now - began[i]
        lo = 0
        hi = n
        while lo < hi:  # the first bound >= v (a value equal to a bound is in its bucket)
            mid = (lo + hi) >> 1
            if edges[mid] < v:
                lo = mid + 1
            else:
                hi = mid
        cells[lo] += 1
        total += v
    return total


def any_nonzero(object array):
    """Whether a 1-D contiguous array (uint64 seqs, bool resets) holds a nonzero element."""
    cdef const uint8_t* raw
    cdef Py_ssize_t i, n
    if cnp.PyArray_Check(array) and cnp.PyArray_TYPE(<cnp.ndarray>array) == cnp.NPY_BOOL:
        raw = flags(array)
        n = dim0(array)
    else:
        raw = <const uint8_t*>u64(array)
        n = 8 * dim0(array)
    for i in range(n):
        if raw[i]:
            return True
    return False
