"""The native API's requests and answers on the wire, read and written as bytes (compiled).

A ``StepRequest`` is read straight from the bytes gRPC received into the
columns the engine takes (ids, ``[n, E]`` float32 values, seqs, resets): no
protobuf message, no Python object per float or per event beyond its id. The
answers (``StepResponse`` with per-event ``Result`` messages, or one
``ResultBatch``) are written as the bytes protobuf itself would write (fields in
number order, defaults left out, scalars packed); tests compare them byte for
byte with protobuf's own serialisation.

The reader takes the canonical encoding protobuf writes, in any field order,
with unknown fields skipped. Anything else that is still legal protobuf (floats
sent unpacked, a field split in several chunks, a message field given twice) is
handed to protobuf's own parser once and read from its canonical form, so every
legal message means what protobuf says it means.
"""

cimport numpy as cnp
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport int32_t, int64_t, uint8_t, uint64_t
from libc.string cimport memcpy, memset

import numpy as np

from service.arrays cimport (
    dim0,
    dim1,
    f32_rows,
    f32_rows_out,
    flags,
    flags_out,
    i32,
    i64,
    i64_out,
    u64,
    u64_out,
)

cnp.import_array()

from google.protobuf.message import DecodeError

from lstm_stream.v1 import lstm_stream_pb2 as pb

if np.little_endian is not True:  # the floats are copied as they lie in memory
    raise ImportError("service.api.codec needs a little-endian machine")

# -- reading -------------------------------------------------------------------------


cdef struct Reader:
    const uint8_t* buf
    Py_ssize_t pos
    Py_ssize_t end


cdef inline bint read_varint(Reader* r, uint64_t* out) noexcept nogil:
    """One varint at ``r.pos``; False when it is cut short or longer than ten bytes."""
    cdef uint64_t value = 0
    cdef int shift = 0
    cdef uint8_t byte
    while r.pos < r.end and shift < 70:
        byte = r.buf[r.pos]
        r.pos += 1
        value |= <uint64_t>(byte & 0x7F) << shift
        if byte < 0x80:
            out[0] = value
            return True
        shift += 7
    return False


cdef inline bint read_len(Reader* r, Py_ssize_t* start, Py_ssize_t* length) noexcept nogil:
    """A length-delimited field's bytes: where they start and how many; False when cut short."""
    cdef uint64_t n
    if not read_varint(r, &n) or n > <uint64_t>(r.end - r.pos):
        return False
    start[0] = r.pos
    length[0] = <Py_ssize_t>n
    r.pos += <Py_ssize_t>n
    return True


cdef inline bint skip(Reader* r, uint64_t wire) noexcept nogil:
    """Skip an unknown field's value; False for groups (left to protobuf) or a cut value."""
    cdef uint64_t ignored
    cdef Py_ssize_t start, length
    if wire == 0:
        return read_varint(r, &ignored)
    if wire == 1:
        r.pos += 8
        return r.pos <= r.end
    if wire == 2:
        return read_len(r, &start, &length)
    if wire == 5:
        r.pos += 4
        return r.pos <= r.end
    return False


cdef inline Py_ssize_t count_varints(const uint8_t* p, Py_ssize_t n) noexcept nogil:
    """How many varints a packed field of ``n`` bytes holds (-1: the last one is cut)."""
    cdef Py_ssize_t count = 0, i
    for i in range(n):
        if p[i] < 0x80:
            count += 1
    if n and p[n - 1] >= 0x80:
        return -1
    return count


cdef class StepRequestWire:
    """A ``StepRequest`` read from its bytes: the columns of its events and its other fields.

    ``columnar`` tells the form. ``values(size)`` gives the ``[n, size]`` float32
    values (a view of the request's bytes in the columnar form) and, in the per-event
    form, which events had another number of values.
    """

    cdef readonly bytes data
    cdef readonly list session_ids
    cdef readonly object seqs
    cdef readonly object resets
    cdef readonly bint include_state
    cdef readonly str model
    cdef readonly uint64_t model_version
    cdef readonly bint columnar
    cdef readonly bint mixed
    cdef readonly Py_ssize_t n_seqs
    cdef readonly Py_ssize_t n_resets
    cdef readonly Py_ssize_t values_bytes
    cdef Py_ssize_t values_at
    cdef object value_at
    cdef object value_count

    @property
    def n(self) -> int:
        return len(self.session_ids)

    def values(self, Py_ssize_t size):
        """``([n, size] float32 values, {event: problem} or None)``.

        Columnar: a view of the request's bytes; ``MalformedBatch`` when the batch's
        lengths disagree. Per event: a copy; an event with another number of values
        gets a zero row and its problem.
        """
        cdef Py_ssize_t n = len(self.session_ids), i
        cdef cnp.npy_intp dims[2]
        if self.columnar:
            self._check_batch(n, size)
            dims[0] = n
            dims[1] = size
            view = cnp.PyArray_SimpleNewFromData(
                2, dims, cnp.NPY_FLOAT32, PyBytes_AS_STRING(self.data) + self.values_at
            )  # what frombuffer(...).reshape(n, size) makes, in one call
            cnp.PyArray_CLEARFLAGS(<cnp.ndarray>view, cnp.NPY_ARRAY_WRITEABLE)
            cnp.set_array_base(<cnp.ndarray>view, self.data)
            return view, None
        out = np.empty((n, size), np.float32)
        if n == 0:
            return out, None
        cdef float* rows = f32_rows_out(out)
        cdef const int64_t* at = i64(self.value_at)
        cdef const int64_t* count = i64(self.value_count)
        cdef const uint8_t* buf = <const uint8_t*>PyBytes_AS_STRING(self.data)
        cdef bint all_fit = True
        with nogil:
            for i in range(n):
                if count[i] == size:
                    memcpy(rows + i * size, buf + at[i], 4 * size)
                else:
                    all_fit = False
                    if size:
                        memset(rows + i * size, 0, 4 * size)
        if all_fit:
            return out, None
        bad = {}
        for i in range(n):
            if count[i] != size:
                bad[i] = f"event has {count[i]} values; the model takes {size}"
        return out, bad

    cdef _check_batch(self, Py_ssize_t n, Py_ssize_t e):
        """A columnar batch whose lengths disagree is refused whole."""
        problems = []
        if self.n_seqs not in (0, n):
            problems.append(f"seqs has {self.n_seqs} entries; expected 0 or {n}")
        if self.n_resets not in (0, n):
            problems.append(f"resets has {self.n_resets} entries; expected 0 or {n}")
        got = self.values_bytes
        if got != n * e * 4:
            # Counted in values, as the per-event form counts them; bytes only when not whole.
            held = f"{got // 4} values" if got % 4 == 0 else f"{got} bytes, not whole float32s,"
            problems.append(f"values holds {held} where {n} x {e} = {n * e} are expected")
        if problems:
            raise MalformedBatch("malformed batch: " + "; ".join(problems))


class MalformedBatch(ValueError):
    """A columnar batch whose lengths disagree (the message says how)."""


cdef str _text(const uint8_t* buf, Py_ssize_t start, Py_ssize_t length):
    """A string field's text (UnicodeDecodeError for bytes that are not UTF-8)."""
    return PyUnicode_DecodeUTF8(<const char*>buf + start, length, NULL)


cdef object _read(bytes data):
    """The request read from canonical bytes, or None when it needs protobuf's parser."""
    cdef Reader r
    r.buf = <const uint8_t*>PyBytes_AS_STRING(data)
    r.pos = 0
    r.end = PyBytes_GET_SIZE(data)
    cdef uint64_t key, value, field, wire
    cdef Py_ssize_t start, length
    cdef Py_ssize_t batch_start = -1, batch_length = 0
    cdef list events = []  # (start, length) of each Event
    cdef StepRequestWire req = StepRequestWire.__new__(StepRequestWire)
    req.data = data
    req.model = ""
    req.seqs = None
    req.resets = None
    while r.pos < r.end:
        if not read_varint(&r, &key):
            return None
        field, wire = key >> 3, key & 7
        if field == 1 and wire == 2:
            if not read_len(&r, &start, &length):
                return None
            events.append((start, length))
        elif field == 2 and wire == 0:
            if not read_varint(&r, &value):
                return None
            req.include_state = value != 0
        elif field == 3 and wire == 2:
            if batch_start >= 0 or not read_len(&r, &batch_start, &batch_length):
                return None  # a second batch merges into the first: protobuf's business
        elif field == 4 and wire == 2:
            if not read_len(&r, &start, &length):
                return None
            req.model = _text(r.buf, start, length)
        elif field == 5 and wire == 0:
            if not read_varint(&r, &value):
                return None
            req.model_version = value
        elif not skip(&r, wire):
            return None
    req.columnar = batch_start >= 0
    req.mixed = req.columnar and len(events) > 0
    if req.columnar:
        if not _read_batch(req, r.buf, batch_start, batch_length):
            return None
    elif not _read_events(req, r.buf, events):
        return None
    return req


cdef bint _read_batch(StepRequestWire req, const uint8_t* buf, Py_ssize_t at, Py_ssize_t size):
    cdef Reader r
    r.buf = buf
    r.pos = at
    r.end = at + size
    cdef uint64_t key, field, wire
    cdef Py_ssize_t start, length, seqs_start = -1, seqs_length = 0
    cdef Py_ssize_t resets_start = -1, resets_length = 0, n_seqs = 0, n_resets = 0
    cdef bint has_values = False
    cdef list ids = []
    req.values_at = 0
    req.values_bytes = 0
    while r.pos < r.end:
        if not read_varint(&r, &key):
            return False
        field, wire = key >> 3, key & 7
        if field == 1 and wire == 2:
            if not read_len(&r, &start, &length):
                return False
            ids.append(_text(buf, start, length))
        elif field == 2 and wire == 2:
            if seqs_start >= 0 or not read_len(&r, &seqs_start, &seqs_length):
                return False
            n_seqs = count_varints(buf + seqs_start, seqs_length)
            if n_seqs < 0:
                return False
        elif field == 3 and wire == 2:
            if has_values or not read_len(&r, &start, &length):
                return False
            has_values = True
            req.values_at = start
            req.values_bytes = length
        elif field == 4 and wire == 2:
            if resets_start >= 0 or not read_len(&r, &resets_start, &resets_length):
                return False
            n_resets = count_varints(buf + resets_start, resets_length)
            if n_resets < 0:
                return False
        elif field in (2, 3, 4):
            return False  # unpacked, or of another wire type: protobuf decides
        elif not skip(&r, wire):
            return False
    req.session_ids = ids
    req.n_seqs = n_seqs
    req.n_resets = n_resets
    if n_seqs:
        req.seqs = _varints(buf + seqs_start, seqs_length, n_seqs)
        if req.seqs is None:
            return False
    if n_resets:
        resets = _varints(buf + resets_start, resets_length, n_resets)
        if resets is None:
            return False
        req.resets = resets != 0
    return True


cdef object _varints(const uint8_t* p, Py_ssize_t size, Py_ssize_t n):
    """A packed field's ``n`` varints as uint64 (None when one is longer than ten bytes)."""
    seq = np.empty(n, np.uint64)
    cdef uint64_t* out = u64_out(seq)
    cdef Reader r
    r.buf = p
    r.pos = 0
    r.end = size
    cdef Py_ssize_t i
    cdef uint64_t value
    for i in range(n):
        if not read_varint(&r, &value):
            return None
        out[i] = value
    return seq


cdef bint _read_events(StepRequestWire req, const uint8_t* buf, list events):
    cdef Py_ssize_t n = len(events), i
    cdef list ids = [None] * n
    at_array = np.zeros(n, np.int64)
    count_array = np.zeros(n, np.int64)
    seqs_array = np.zeros(n, np.uint64)
    resets_array = np.zeros(n, np.bool_)
    cdef int64_t* at = i64_out(at_array)
    cdef int64_t* count = i64_out(count_array)
    cdef uint64_t* seqs = u64_out(seqs_array)
    cdef uint8_t* resets = flags_out(resets_array)
    cdef Reader r
    cdef uint64_t key, value, field, wire
    cdef Py_ssize_t start, length, id_start, id_length
    cdef bint any_seq = False, any_reset = False, has_values
    for i in range(n):
        start, length = events[i]
        r.buf = buf
        r.pos = start
        r.end = start + length
        id_start = 0
        id_length = 0
        has_values = False
        while r.pos < r.end:
            if not read_varint(&r, &key):
                return False
            field, wire = key >> 3, key & 7
            if field == 1 and wire == 2:
                if not read_len(&r, &id_start, &id_length):
                    return False
            elif field == 2 and wire == 0:
                if not read_varint(&r, &value):
                    return False
                seqs[i] = value
            elif field == 3 and wire == 2:
                if has_values or not read_len(&r, &start, &length) or length % 4:
                    return False  # in chunks, or cut: protobuf decides
                has_values = True
                at[i] = start
                count[i] = length // 4
            elif field == 4 and wire == 0:
                if not read_varint(&r, &value):
                    return False
                resets[i] = value != 0
            elif field in (1, 2, 3, 4):
                return False  # unpacked floats, or another wire type: protobuf decides
            elif not skip(&r, wire):
                return False
        ids[i] = _text(buf, id_start, id_length)
        any_seq |= seqs[i] != 0
        any_reset |= resets[i] != 0
    req.session_ids = ids
    req.value_at = at_array
    req.value_count = count_array
    req.seqs = seqs_array if any_seq else None
    req.resets = resets_array if any_reset else None
    return True


def read_step_request(bytes data):
    """A ``StepRequest``'s bytes as a ``StepRequestWire``; None when they are not one."""
    try:
        req = _read(data)
    except UnicodeDecodeError:
        req = None
    if req is not None:
        return req
    try:  # legal but not canonical, or not a StepRequest at all: protobuf decides
        message = pb.StepRequest.FromString(data)
    except DecodeError:
        return None
    message.DiscardUnknownFields()
    return _read(message.SerializeToString())  # protobuf's canonical form: always reads


# -- writing -------------------------------------------------------------------------


def _same_length(Py_ssize_t n, *others):
    """Every column has a row per event (the loops below do not check bounds)."""
    for other in others:
        if other != n:
            raise ValueError(f"columns of {n} and {other} rows")


cdef inline Py_ssize_t varint_size(uint64_t value) noexcept nogil:
    cdef Py_ssize_t n = 1
    while value >= 0x80:
        value >>= 7
        n += 1
    return n


cdef inline Py_ssize_t put_varint(uint8_t* out, Py_ssize_t pos, uint64_t value) noexcept nogil:
    while value >= 0x80:
        out[pos] = <uint8_t>((value & 0x7F) | 0x80)
        value >>= 7
        pos += 1
    out[pos] = <uint8_t>value
    return pos + 1


def varint(value: int) -> bytes:
    """A protobuf varint; negative numbers as their 64-bit two's complement (int32/int64)."""
    cdef uint64_t v = <uint64_t>(value & 0xFFFFFFFFFFFFFFFF)
    cdef uint8_t buf[10]
    cdef Py_ssize_t n = put_varint(buf, 0, v)
    return PyBytes_FromStringAndSize(<char*>buf, n)


cdef inline Py_ssize_t put_bytes(
    uint8_t* out, Py_ssize_t pos, const void* src, Py_ssize_t n
) noexcept nogil:
    if n:
        memcpy(out + pos, src, n)
    return pos + n


def encode_batch(
    object step_column,
    object output_rows,
    object code_column,
    object duplicate_flags,
    dict errors,
    object version_column,
) -> bytes:
    """A ``StepResponse`` whose ``batch`` is the ``ResultBatch`` of n events, serialised.

    ``errors`` maps an event to its message (empty for the others); ``duplicate_flags``
    is a bool (or uint8) array.
    """
    cdef const uint64_t* steps = u64(step_column)
    cdef const float* outputs = f32_rows(output_rows)
    cdef const int32_t* codes = i32(code_column)
    cdef const uint8_t* duplicates = flags(duplicate_flags)
    cdef const uint64_t* versions = u64(version_column)
    cdef Py_ssize_t n = dim0(step_column), i
    cdef Py_ssize_t steps_len = 0, codes_len = 0, versions_len = 0, errors_len = 0
    cdef Py_ssize_t out_len = 4 * n * dim1(output_rows), body = 0, total, pos = 0
    cdef list texts = None
    cdef const char* text
    cdef Py_ssize_t text_len
    _same_length(
        n,
        dim0(output_rows),
        dim0(code_column),
        dim0(duplicate_flags),
        dim0(version_column),
    )
    for i in range(n):
        steps_len += varint_size(steps[i])
        codes_len += varint_size(<uint64_t><int64_t>codes[i])
        versions_len += varint_size(versions[i])
    if errors:
        texts = [(errors.get(i) or "").encode() for i in range(n)]
        for i in range(n):
            text_len = PyBytes_GET_SIZE(texts[i])
            errors_len += 1 + varint_size(text_len) + text_len
    else:
        errors_len = 2 * n
    if n:
        body = (
            1 + varint_size(steps_len) + steps_len
            + 1 + varint_size(codes_len) + codes_len
            + 1 + varint_size(n) + n
            + errors_len
            + 1 + varint_size(versions_len) + versions_len
        )
    if out_len:
        body += 1 + varint_size(out_len) + out_len
    total = 1 + varint_size(body) + body
    result = PyBytes_FromStringAndSize(NULL, total)
    cdef uint8_t* out = <uint8_t*>PyBytes_AS_STRING(result)
    out[0] = 0x12  # StepResponse.batch = 2
    pos = put_varint(out, 1, body)
    if n:
        out[pos] = 0x0A  # steps = 1, packed
        pos = put_varint(out, pos + 1, steps_len)
        for i in range(n):
            pos = put_varint(out, pos, steps[i])
    if out_len:
        out[pos] = 0x12  # outputs = 2
        pos = put_varint(out, pos + 1, out_len)
        pos = put_bytes(out, pos, outputs, out_len)
    if n:
        out[pos] = 0x1A  # codes = 3, packed
        pos = put_varint(out, pos + 1, codes_len)
        for i in range(n):
            pos = put_varint(out, pos, <uint64_t><int64_t>codes[i])
        out[pos] = 0x22  # duplicates = 4, packed
        pos = put_varint(out, pos + 1, n)
        for i in range(n):
            out[pos + i] = 1 if duplicates[i] else 0
        pos += n
        for i in range(n):  # errors = 5, one string each
            out[pos] = 0x2A
            if texts is None:
                out[pos + 1] = 0
                pos += 2
            else:
                text = PyBytes_AS_STRING(texts[i])
                text_len = PyBytes_GET_SIZE(texts[i])
                pos = put_varint(out, pos + 1, text_len)
                pos = put_bytes(out, pos, text, text_len)
        out[pos] = 0x32  # model_versions = 6, packed
        pos = put_varint(out, pos + 1, versions_len)
        for i in range(n):
            pos = put_varint(out, pos, versions[i])
    assert pos == total
    return result


# Result's fields: tag = field number << 3 | wire type (0 varint, 2 length-delimited).
cdef enum:
    RESULTS = 0x0A  # StepResponse.results = 1
    SESSION_ID = 0x0A  # Result.session_id = 1
    SEQ = 0x10  # Result.seq = 2
    STEP = 0x18  # Result.step = 3
    OUTPUT = 0x22  # Result.output = 4 (packed)
    DUPLICATE = 0x28  # Result.duplicate = 5
    CODE = 0x30  # Result.code = 6
    ERROR = 0x3A  # Result.error = 7
    HIDDEN = 0x42  # Result.hidden = 8 (packed)
    CELL = 0x4A  # Result.cell = 9 (packed)
    STATES = 0x52  # Result.states = 10 (NamedState messages)
    STATE_NAME = 0x0A  # NamedState.name = 1
    STATE_VALUES = 0x12  # NamedState.values = 2 (packed)
    MODEL_VERSION = 0x58  # Result.model_version = 11


def encode_results(
    list session_ids,
    object seq_column,
    object step_column,
    object output_rows,
    object duplicate_flags,
    dict errors,
    list states,
    object version_column,
) -> bytes:
    """A ``StepResponse`` with one ``Result`` per event, serialised.

    ``outputs`` and each of ``states`` (``(name, [n, k] float32 rows)``: ``hidden``
    and ``cell`` go to their own fields, other names to ``states``, when the client
    asked for state) are rows per event; an event in ``errors`` (``{i: (code,
    message)}``) gets its code and message and no output or state. ``versions[i]``:
    the model version that answered event i (0: not sent).
    """
    cdef const uint64_t* steps = u64(step_column)
    cdef const float* outputs = f32_rows(output_rows)
    cdef const uint8_t* duplicates = flags(duplicate_flags)
    cdef const uint64_t* versions = u64(version_column)
    cdef bint has_seqs = seq_column is not None
    cdef const uint64_t* seqs = u64(seq_column) if has_seqs else NULL
    cdef Py_ssize_t n = len(session_ids), i, k, row_width = dim1(output_rows), total = 0, pos
    cdef Py_ssize_t n_states = len(states), body, id_len, entry_len, state_width
    _same_length(
        n,
        dim0(step_column),
        dim0(output_rows),
        dim0(duplicate_flags),
        dim0(version_column),
    )
    if has_seqs:
        _same_length(n, dim0(seq_column))
    cdef list ids = [None] * n
    cdef list heads = []  # per state: the bytes in front of a row's floats
    cdef list rows_of = []
    cdef const float* rows
    for _, state in states:
        _same_length(n, state.shape[0])
    ordered = sorted(states, key=lambda s: {"hidden": 0, "cell": 1}.get(s[0], 2))
    for name, state in ordered:
        key = name.encode()
        if state.shape[1] == 0 and name in ("hidden", "cell"):
            continue  # an empty packed field is not written
        if name == "hidden" or name == "cell":
            heads.append(bytes([HIDDEN if name == "hidden" else CELL]) + varint(4 * state.shape[1]))
        else:
            entry = (bytes([STATE_NAME]) + varint(len(key)) + key) if key else b""
            if state.shape[1]:
                entry += bytes([STATE_VALUES]) + varint(4 * state.shape[1])
            entry_len = len(entry) + 4 * state.shape[1]
            heads.append(bytes([STATES]) + varint(entry_len) + entry)
        rows_of.append(np.ascontiguousarray(state, np.float32))
    n_states = len(heads)
    cdef list sizes = [0] * n
    cdef list texts = [None] * n
    for i in range(n):
        ids[i] = (<str>session_ids[i]).encode("utf-8", "surrogatepass")
        id_len = PyBytes_GET_SIZE(ids[i])
        body = (1 + varint_size(id_len) + id_len) if id_len else 0
        if has_seqs and seqs[i]:
            body += 1 + varint_size(seqs[i])
        if steps[i]:
            body += 1 + varint_size(steps[i])
        failed = errors.get(i) if errors else None
        if failed is None:
            if row_width:
                body += 1 + varint_size(4 * row_width) + 4 * row_width
            if duplicates[i]:
                body += 2
            for k in range(n_states):
                body += len(heads[k]) + 4 * rows_of[k].shape[1]
            if versions[i]:
                body += 1 + varint_size(versions[i])
        else:
            code, message = failed
            texts[i] = (code, message.encode())
            if duplicates[i]:
                body += 2
            if code:
                body += 1 + varint_size(<uint64_t><int64_t>code)
            if texts[i][1]:
                body += 1 + varint_size(len(texts[i][1])) + len(texts[i][1])
        sizes[i] = body
        total += 1 + varint_size(body) + body
    result = PyBytes_FromStringAndSize(NULL, total)
    cdef uint8_t* out = <uint8_t*>PyBytes_AS_STRING(result)
    pos = 0
    for i in range(n):
        out[pos] = RESULTS
        pos = put_varint(out, pos + 1, sizes[i])
        id_len = PyBytes_GET_SIZE(ids[i])
        if id_len:
            out[pos] = SESSION_ID
            pos = put_varint(out, pos + 1, id_len)
            pos = put_bytes(out, pos, PyBytes_AS_STRING(ids[i]), id_len)
        if has_seqs and seqs[i]:
            out[pos] = SEQ
            pos = put_varint(out, pos + 1, seqs[i])
        if steps[i]:
            out[pos] = STEP
            pos = put_varint(out, pos + 1, steps[i])
        if texts[i] is None:
            if row_width:
                out[pos] = OUTPUT
                pos = put_varint(out, pos + 1, 4 * row_width)
                pos = put_bytes(out, pos, outputs + i * row_width, 4 * row_width)
            if duplicates[i]:
                out[pos] = DUPLICATE
                out[pos + 1] = 1
                pos += 2
            for k in range(n_states):
                head = heads[k]
                pos = put_bytes(out, pos, PyBytes_AS_STRING(head), PyBytes_GET_SIZE(head))
                state_width = dim1(rows_of[k])
                if state_width:
                    rows = f32_rows(rows_of[k])
                    pos = put_bytes(out, pos, rows + i * state_width, 4 * state_width)
            if versions[i]:
                out[pos] = MODEL_VERSION
                pos = put_varint(out, pos + 1, versions[i])
        else:
            code, text = texts[i]
            if duplicates[i]:
                out[pos] = DUPLICATE
                out[pos + 1] = 1
                pos += 2
            if code:
                out[pos] = CODE
                pos = put_varint(out, pos + 1, <uint64_t><int64_t>code)
            if text:
                out[pos] = ERROR
                pos = put_varint(out, pos + 1, len(text))
                pos = put_bytes(out, pos, PyBytes_AS_STRING(text), len(text))
    assert pos == total
    return result
