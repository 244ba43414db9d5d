"""The per-event form's hot path on the wire: values read from, and results written as, bytes.

Building one ``Result`` message per event and converting every float to a Python
object and back costs more CPU than the rest of the request (docs/PERFORMANCE.md).
``encode_results`` writes the ``StepResponse`` bytes protobuf itself would write
(fields in number order, defaults left out, floats packed; a test compares them
byte for byte), and ``event_values`` takes each event's floats straight from the
event's own serialisation instead of one Python float at a time.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from itertools import accumulate, chain

import numpy as np

from lstm_stream.v1 import lstm_stream_pb2 as pb

_MASK64 = (1 << 64) - 1

# Tags: field number << 3 | wire type (0 varint, 2 length-delimited).
_RESULTS = b"\x0a"  # StepResponse.results = 1
_SESSION_ID = b"\x0a"  # Result.session_id = 1
_SEQ = b"\x10"  # Result.seq = 2
_STEP = b"\x18"  # Result.step = 3
_OUTPUT = 0x22  # Result.output = 4 (packed)
_DUPLICATE = b"\x28\x01"  # Result.duplicate = 5, true
_CODE = b"\x30"  # Result.code = 6
_ERROR = b"\x3a"  # Result.error = 7
_HIDDEN = 0x42  # Result.hidden = 8 (packed)
_CELL = 0x4A  # Result.cell = 9 (packed)
_STATES = b"\x52"  # Result.states = 10 (NamedState messages)
_STATE_NAME = b"\x0a"  # NamedState.name = 1
_STATE_VALUES = 0x12  # NamedState.values = 2 (packed)
_MODEL_VERSION = b"\x58"  # Result.model_version = 11
_VALUES = 0x1A  # Event.values = 3 (packed)
_RESET = b"\x20\x01"  # Event.reset = 4, true

_SMALL = [bytes((v,)) for v in range(0x80)]


def varint(value: int) -> bytes:
    """A protobuf varint; negative numbers as their 64-bit two's complement (int32/int64)."""
    if 0 <= value < 0x80:
        return _SMALL[value]
    value &= _MASK64
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def packed_floats_header(tag: int, count: int) -> bytes:
    """The tag and length in front of ``count`` packed float32 values."""
    return bytes((tag,)) + varint(4 * count)


def encode_results(
    session_ids: Sequence[str],
    seqs: Sequence[int],
    steps: Sequence[int],
    outputs: np.ndarray,
    duplicates: Sequence[bool],
    errors: dict[int, tuple[int, str]],
    hidden: np.ndarray | None = None,
    cell: np.ndarray | None = None,
    named: Sequence[tuple[str, np.ndarray]] = (),
    versions: Sequence[int] | None = None,
) -> bytes:
    """A ``StepResponse`` with one ``Result`` per event, serialised.

    ``outputs`` (and ``hidden``/``cell`` and the ``named`` other states when the
    client asked for state) are ``[n, k]`` float32 rows; an event in ``errors``
    gets its code and message and no output or state, as docs/PROTOCOL.md says.
    ``versions[i]``: the model version that answered event i (0 or None: not sent).
    """
    n = len(session_ids)
    width = outputs.shape[1]
    out = outputs.astype("<f4", copy=False).tobytes()
    size = 4 * width
    output_head = packed_floats_header(_OUTPUT, width) if width else b""
    states = []
    for tag, rows in ((_HIDDEN, hidden), (_CELL, cell)):
        if rows is not None and rows.shape[1]:
            states.append((packed_floats_header(tag, rows.shape[1]), rows))
    for name, rows in named:
        # A NamedState: its name, then its packed values; the entry's length is fixed.
        key = name.encode()
        entry = _STATE_NAME + varint(len(key)) + key if key else b""
        if rows.shape[1]:
            entry += packed_floats_header(_STATE_VALUES, rows.shape[1])
        entry_len = len(entry) + 4 * rows.shape[1]
        states.append((_STATES + varint(entry_len) + entry, rows))
    state_bytes = [(head, rows.astype("<f4", copy=False).tobytes()) for head, rows in states]
    parts: list[bytes] = []
    for i in range(n):
        sid = session_ids[i].encode()
        fields: list[bytes] = [_SESSION_ID, varint(len(sid)), sid] if sid else []
        if seqs[i]:
            fields += (_SEQ, varint(seqs[i]))
        if steps[i]:
            fields += (_STEP, varint(steps[i]))
        failed = errors.get(i)
        if failed is None:
            if width:
                fields += (output_head, out[i * size : (i + 1) * size])
            if duplicates[i]:
                fields.append(_DUPLICATE)
            for head, raw in state_bytes:
                k = len(raw) // n
                fields += (head, raw[i * k : (i + 1) * k])
            if versions is not None and versions[i]:
                fields += (_MODEL_VERSION, varint(versions[i]))
        else:
            code, message = failed
            if duplicates[i]:
                fields.append(_DUPLICATE)
            if code:
                fields += (_CODE, varint(code))
            text = message.encode()
            if text:
                fields += (_ERROR, varint(len(text)), text)
        body = b"".join(fields)
        parts += (_RESULTS, varint(len(body)), body)
    return b"".join(parts)


BYTES_FROM = 8
"""From this many events on, values are cut from the serialised events; below it,
one float at a time costs less than the numpy calls (measured crossover: 6-10)."""


def event_values(events: Sequence[pb.Event], resets: Sequence[bool], size: int) -> np.ndarray:
    """``[n, size]`` float32: each event's values, every event having exactly ``size``.

    A parsed ``Event`` serialises with its fields in number order and ``values``
    packed, so its floats are the last ``4 * size`` bytes, or the ones before
    ``reset``'s two bytes. Fields this schema does not know would come after them:
    the caller discards those first. The bytes in front of each run must be the
    field's own tag and length; if ever not, the floats are read one by one.
    """
    n = len(events)
    if n < BYTES_FROM:
        return _one_by_one(events, n, size)
    raws = [ev.SerializeToString() for ev in events]
    buf = np.frombuffer(b"".join(raws), np.uint8)
    ends = np.fromiter(accumulate(map(len, raws)), np.int64, n)
    if any(resets):
        ends -= 2 * np.asarray(resets, np.int64)
    head, span = _layout(size)
    rows = buf[(ends - span.size)[:, None] + span]  # [n, tag and length + 4 * size]
    if not (rows[:, : head.size] == head).all():
        return _one_by_one(events, n, size)
    return np.ascontiguousarray(rows[:, head.size :]).view("<f4")


def _one_by_one(events: Sequence[pb.Event], n: int, size: int) -> np.ndarray:
    floats = chain.from_iterable([ev.values for ev in events])
    return np.fromiter(floats, np.float32, n * size).reshape(n, size)


@functools.cache
def _layout(size: int) -> tuple[np.ndarray, np.ndarray]:
    """The packed ``values`` field's tag and length bytes, and the offsets of the
    field (those bytes and the floats) counted back from its end."""
    head = np.frombuffer(packed_floats_header(_VALUES, size), np.uint8)
    return head, np.arange(head.size + 4 * size)
