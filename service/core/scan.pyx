"""Admission's and the pool's loops over events, compiled: one pass where numpy took a dozen.

``scan`` joins the queued requests of one model into the columns admission
works on and, in the same pass, checks every event's values for NaN/Inf and
looks its session up in a lane's index; ``first_per_row`` picks the earliest
pending event of each row for a run, and ``split_rows``/``join_rows`` take those
events out of the pool's columns and add new ones, a call for all the columns.
"""

cimport numpy as cnp
from cpython.dict cimport PyDict_GetItemWithError
from cpython.object cimport PyObject
from libc.math cimport isfinite
from libc.stdint cimport int64_t, uint8_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy

import numpy as np

from service.arrays cimport (
    any_rows,
    dim0,
    dim1,
    empty_rows_like,
    f32_rows,
    f32_rows_out,
    f64_out,
    first_outside,
    flags,
    flags_out,
    i64,
    i64_out,
    row_bytes,
    u64,
    u64_out,
)

cnp.import_array()


cdef class Scanned:
    """The columns of the events admitted together, and what the scan found.

    ``slots[i]`` is event i's row in the index scanned (-1: not there); ``not_finite``
    lists the events whose values hold NaN or Inf; ``bad`` is whether any request
    brought events refused while decoding; ``asked`` whether any request names a version.
    """

    cdef readonly list session_ids
    cdef readonly object values
    cdef readonly object seqs
    cdef readonly object resets
    cdef readonly object job_of
    cdef readonly object t0
    cdef readonly object slots
    cdef readonly list not_finite
    cdef readonly Py_ssize_t unknown
    cdef readonly bint bad
    cdef readonly bint asked


def scan(list jobs, dict index, Py_ssize_t event_size):
    """Scan the events of ``jobs`` (each with an ``EventBlock``), in order.

    ``index`` maps session ids to rows (None: look nothing up; every slot is -1).
    """
    cdef Py_ssize_t n_jobs = len(jobs), n = 0, j, i, at = 0, count
    for job in jobs:
        n += <Py_ssize_t>job.n
    cdef Scanned out = Scanned.__new__(Scanned)
    values = None
    if n_jobs == 1:
        block = (<object>jobs[0]).block
        ids = block.session_ids
        out.session_ids = ids if type(ids) is list else list(ids)
        values = block.values
    else:
        out.session_ids = []
        values = np.empty((n, event_size), np.float32)
    seqs = np.zeros(n, np.uint64)
    resets = np.zeros(n, np.bool_)
    job_of = np.empty(n, np.int64)
    t0 = np.empty(n, np.float64)
    slots = np.empty(n, np.int64)
    cdef uint64_t* seq_col = u64_out(seqs)
    cdef uint8_t* reset_col = flags_out(resets)
    cdef int64_t* job_col = i64_out(job_of)
    cdef double* t0_col = f64_out(t0)
    cdef float* value_rows = f32_rows_out(values) if n_jobs > 1 else NULL
    cdef const float* part
    cdef const uint64_t* part_seqs
    cdef const uint8_t* part_resets
    cdef double started
    out.bad = False
    out.asked = False
    for j in range(n_jobs):
        job = jobs[j]
        block = job.block
        count = job.n
        started = job.t0
        if job.version:
            out.asked = True
        if block.bad:
            out.bad = True
        if n_jobs > 1:
            out.session_ids.extend(block.session_ids)
            if count:
                part = f32_rows(block.values)
                if dim0(block.values) != count or dim1(block.values) != event_size:
                    raise ValueError(
                        f"a request's values are {dim0(block.values)} x "
                        f"{dim1(block.values)}, not {count} x {event_size}"
                    )
                memcpy(value_rows + at * event_size, part, 4 * count * event_size)
        if block.seqs is not None:
            part_seqs = u64(block.seqs)
            for i in range(count):
                seq_col[at + i] = part_seqs[i]
        if block.resets is not None:
            part_resets = flags(block.resets)
            for i in range(count):
                reset_col[at + i] = part_resets[i] != 0
        for i in range(count):
            job_col[at + i] = j
            t0_col[at + i] = started
        at += count
    out.values = values
    out.seqs = seqs
    out.resets = resets
    out.job_of = job_of
    out.t0 = t0
    out.slots = slots
    out.not_finite = _not_finite(values)
    out.unknown = _lookup(index, out.session_ids, i64_out(slots))
    return out


cdef list _not_finite(object values):
    cdef const float* rows = f32_rows(values)
    cdef Py_ssize_t n = dim0(values), e = dim1(values), i, k
    cdef list found = None
    for i in range(n):
        for k in range(e):
            if not isfinite(rows[i * e + k]):
                if found is None:
                    found = []
                found.append(i)
                break
    return found


cdef Py_ssize_t _lookup(dict index, list ids, int64_t* slots) except -1:
    """Each id's row in ``index`` (-1: none); how many were not there."""
    cdef Py_ssize_t n = len(ids), i, unknown = 0
    cdef PyObject* row
    for i in range(n):
        row = NULL if index is None else PyDict_GetItemWithError(index, ids[i])
        if row is NULL:
            slots[i] = -1
            unknown += 1
        else:
            slots[i] = <int64_t><object>row
    return unknown


def first_per_row(object slots, Py_ssize_t max_batch, object marks):
    """Positions of the first event of each row in ``slots``, in order, at most ``max_batch``.

    ``marks`` is scratch with a cell per row, all -1 on entry and again on return.
    """
    cdef const int64_t* rows = i64(slots)
    cdef int64_t* mark = i64_out(marks)
    cdef Py_ssize_t n = dim0(slots), size = dim0(marks), i, taken = 0
    cdef Py_ssize_t bad = first_outside(rows, n, size)
    if bad >= 0:
        raise IndexError(f"row {rows[bad]} outside {size} marks")
    picked = np.empty(min(n, max_batch), np.int64)
    cdef int64_t* out = i64_out(picked)
    for i in range(n):
        if taken == max_batch:
            break
        if mark[rows[i]] < 0:
            mark[rows[i]] = i
            out[taken] = i
            taken += 1
    for i in range(taken):
        mark[rows[out[i]]] = -1
    return picked[:taken] if taken < dim0(picked) else picked


def split_rows(dict columns, object picked, Py_ssize_t n):
    """``({name: column[picked]}, {name: the other rows of column})`` for columns of ``n``
    rows each (any dtype and width; ``picked``: sorted, distinct positions), in order.

    One call for what took each column two fancy indexings and a mask (a pool's take).
    """
    cdef const int64_t* at = i64(picked)
    cdef Py_ssize_t k = dim0(picked), i, p, start, size
    cdef uint8_t* chosen = <uint8_t*>calloc(n if n else 1, 1)
    if chosen is NULL:
        raise MemoryError()
    cdef char* src
    cdef char* into_taken
    cdef char* into_kept
    cdef dict taken = {}, kept = {}
    try:
        for p in range(k):
            if at[p] < 0 or at[p] >= n or (p and at[p] <= at[p - 1]):
                raise IndexError(f"picked positions must be sorted, distinct and below {n}")
            chosen[at[p]] = 1
        for name, column in columns.items():
            src = any_rows(column)
            if dim0(column) != n:
                raise ValueError(f"column {name!r} has {dim0(column)} rows, not {n}")
            size = row_bytes(column)
            taken_rows = empty_rows_like(column, k)
            kept_rows = empty_rows_like(column, n - k)
            into_taken = any_rows(taken_rows)
            into_kept = any_rows(kept_rows)
            start = 0
            for i in range(1, n + 1):  # copy each stretch of rows going the same way at once
                if i == n or chosen[i] != chosen[start]:
                    if chosen[start]:
                        memcpy(into_taken, src + start * size, (i - start) * size)
                        into_taken += (i - start) * size
                    else:
                        memcpy(into_kept, src + start * size, (i - start) * size)
                        into_kept += (i - start) * size
                    start = i
            taken[name] = taken_rows
            kept[name] = kept_rows
    finally:
        free(chosen)
    return taken, kept


def join_rows(dict first, dict second, tuple names):
    """``{name: concatenate((first[name], second[name]))}`` for each of ``names``."""
    cdef dict out = {}
    cdef Py_ssize_t a, b, size
    cdef char* into
    cdef char* from_head
    cdef char* from_tail
    for name in names:
        head = first[name]
        tail = second[name]
        from_head = any_rows(head)
        from_tail = any_rows(tail)
        size = row_bytes(head)
        if (
            row_bytes(tail) != size
            or not cnp.PyArray_EquivTypenums(
                cnp.PyArray_TYPE(<cnp.ndarray>head), cnp.PyArray_TYPE(<cnp.ndarray>tail)
            )
        ):
            raise ValueError(
                f"column {name!r}: {tail.dtype} {tail.shape} after {head.dtype} {head.shape}"
            )
        a = dim0(head)
        b = dim0(tail)
        joined = empty_rows_like(head, a + b)
        into = any_rows(joined)
        if a:
            memcpy(into, from_head, a * size)
        if b:
            memcpy(into + a * size, from_tail, b * size)
        out[name] = joined
    return out


def result_columns(Py_ssize_t n, Py_ssize_t output_size):
    """Zeroed answers for n events: steps, ``[n, output_size]`` outputs, codes, duplicates
    and versions (one call for the five arrays an intake holds)."""
    return (
        np.zeros(n, np.uint64),
        np.zeros((n, output_size), np.float32),
        np.zeros(n, np.int32),
        np.zeros(n, np.bool_),
        np.zeros(n, np.uint64),
    )


def job_counts(object jobs):
    """``[(job, how many of jobs are it), ...]`` for each job that occurs, by job number."""
    cdef const int64_t* of = i64(jobs)
    cdef Py_ssize_t n = dim0(jobs), i, top = -1
    for i in range(n):
        if of[i] < 0:
            raise IndexError(f"job {of[i]}")
        if of[i] > top:
            top = of[i]
    if top < 0:
        return []
    cdef int64_t* counts = <int64_t*>calloc(top + 1, sizeof(int64_t))
    if counts is NULL:
        raise MemoryError()
    try:
        for i in range(n):
            counts[of[i]] += 1
        return [(j, counts[j]) for j in range(top + 1) if counts[j]]
    finally:
        free(counts)


def stretches(const int64_t[:] keys):
    """``[(key, start, end), ...]``: each stretch of equal neighbouring keys, in order.

    A key may come back after another's (a run's intakes: events that waited join
    the pool behind later ones), and each of its stretches is listed.
    """
    cdef Py_ssize_t n = keys.shape[0], i, start = 0
    cdef list out = []
    for i in range(1, n):
        if keys[i] != keys[start]:
            out.append((keys[start], start, i))
            start = i
    if n:
        out.append((keys[start], start, n))
    return out
