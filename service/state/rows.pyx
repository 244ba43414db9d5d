"""A table's rows taken and written by slot in compiled loops: a run's gathers and scatters.

numpy's fancy indexing of a 2-D array (``table[slots]``, ``table[slots] = rows``) costs
1.5-7 µs per call, most of it dispatch, several times per run; these copy each row
with one memcpy (``timeit``: 0.3-2 µs, arrays read through ``service/arrays.pxd``).
A run's counters (``step``, ``last_seq``, ``updated``) are read and written in one
call each, where numpy took three or four 1-D operations (a single one of those is
cheaper than a call here, so other 1-D columns keep numpy's indexing). Slots are
distinct where rows are written (one event per session per run).
"""

cimport numpy as cnp
from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memcpy

import numpy as np

from service.arrays cimport (
    dim0,
    dim1,
    f32_rows,
    f32_rows_out,
    f64_out,
    first_outside,
    i64,
    u64,
    u64_out,
)

cnp.import_array()


cdef inline int _check_slots(const int64_t* slots, Py_ssize_t n, Py_ssize_t rows) except -1:
    """Every slot is a row of the table: a bad slot is a bug, raised before any write."""
    cdef Py_ssize_t bad = first_outside(slots, n, rows)
    if bad >= 0:
        raise IndexError(f"slot {slots[bad]} outside a table of {rows} rows")
    return 0


def take_rows(object table, object slots):
    """``table[slots]``: a new ``[n, k]`` float32 array."""
    cdef const float* src = f32_rows(table)
    cdef const int64_t* at = i64(slots)
    cdef Py_ssize_t n = dim0(slots), k = dim1(table), rows = dim0(table), i
    _check_slots(at, n, rows)
    out = np.empty((n, k), np.float32)
    if n == 0 or k == 0:
        return out
    cdef float* dst = f32_rows_out(out)
    for i in range(n):
        memcpy(dst + i * k, src + at[i] * k, k * sizeof(float))
    return out


def put_rows(object table, object slots, object rows):
    """``table[slots] = rows``."""
    cdef float* dst = f32_rows_out(table)
    cdef const int64_t* at = i64(slots)
    cdef const float* src = f32_rows(rows)
    cdef Py_ssize_t n = dim0(slots), k = dim1(table), height = dim0(table), i
    if dim0(rows) != n or dim1(rows) != k:
        raise ValueError(f"{dim0(rows)} x {dim1(rows)} rows for {n} slots of width {k}")
    _check_slots(at, n, height)
    if k == 0:
        return
    for i in range(n):
        memcpy(dst + at[i] * k, src + i * k, k * sizeof(float))


def advanced(object step, object last_seq, object slots, object seqs):
    """The rows' ``step`` and ``last_seq`` once a run of one event each is applied:
    ``step + 1``, and the greater of ``last_seq`` and the event's seq (``seqs`` None:
    no event has one). Two new uint64 arrays."""
    cdef const uint64_t* steps_now = u64(step)
    cdef const uint64_t* lasts_now = u64(last_seq)
    cdef const int64_t* at = i64(slots)
    cdef Py_ssize_t n = dim0(slots), i
    _check_slots(at, n, min(dim0(step), dim0(last_seq)))
    cdef int64_t slot
    cdef const uint64_t* given = NULL
    if seqs is not None:
        given = u64(seqs)
        if dim0(seqs) != n:
            raise ValueError(f"{dim0(seqs)} seqs for {n} slots")
    new_step = np.empty(n, np.uint64)
    new_last = np.empty(n, np.uint64)
    cdef uint64_t* steps = u64_out(new_step)
    cdef uint64_t* lasts = u64_out(new_last)
    cdef uint64_t last
    for i in range(n):
        slot = at[i]
        steps[i] = steps_now[slot] + 1
        last = lasts_now[slot]
        lasts[i] = given[i] if given != NULL and given[i] > last else last
    return new_step, new_last


def put_counters(
    object step,
    object last_seq,
    object updated,
    object slots,
    object new_step,
    object new_last,
    double now,
):
    """``step[slots] = new_step``, ``last_seq[slots] = new_last``, ``updated[slots] = now``."""
    cdef uint64_t* steps = u64_out(step)
    cdef uint64_t* lasts = u64_out(last_seq)
    cdef double* times = f64_out(updated)
    cdef const int64_t* at = i64(slots)
    cdef const uint64_t* step_in = u64(new_step)
    cdef const uint64_t* last_in = u64(new_last)
    cdef Py_ssize_t n = dim0(slots), i
    cdef Py_ssize_t rows = min(dim0(step), dim0(last_seq), dim0(updated))
    if dim0(new_step) != n or dim0(new_last) != n:
        raise ValueError(f"{dim0(new_step)} steps, {dim0(new_last)} seqs for {n} slots")
    _check_slots(at, n, rows)
    for i in range(n):
        steps[at[i]] = step_in[i]
        lasts[at[i]] = last_in[i]
        times[at[i]] = now
