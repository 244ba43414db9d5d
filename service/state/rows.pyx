"""The session table's per-row counters, updated in one compiled loop (compiled)."""

from libc.stdint cimport int32_t, int64_t


def add_at(int32_t[::1] counts, const int64_t[::1] rows, int32_t delta):
    """``counts[row] += delta`` for each of ``rows``, a row as often as it is listed."""
    cdef Py_ssize_t i
    for i in range(rows.shape[0]):
        counts[rows[i]] += delta
