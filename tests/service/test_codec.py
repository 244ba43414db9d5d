"""The per-event wire codec: byte for byte what protobuf writes, and values as sent."""

from __future__ import annotations

import grpc
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from lstm_stream.v1 import lstm_stream_pb2 as pb
from lstm_stream.v1 import lstm_stream_pb2_grpc as pb_grpc
from service.api.codec import BYTES_FROM, encode_results, event_values, varint
from service.server import Server

from .reference import Reference

U64 = st.integers(0, 2**64 - 1)
FLOATS = st.floats(width=32, allow_nan=False)
IDS = st.text(min_size=0, max_size=12)


def protobuf_results(
    ids: list[str],
    seqs: list[int],
    steps: list[int],
    outputs: np.ndarray,
    duplicates: list[bool],
    errors: dict[int, tuple[int, str]],
    hidden: np.ndarray | None,
    cell: np.ndarray | None,
    named: list[tuple[str, np.ndarray]],
    versions: list[int],
) -> bytes:
    """The same answer built as messages (how the servicer used to) and serialised."""
    response = pb.StepResponse()
    for i, sid in enumerate(ids):
        r = response.results.add(session_id=sid, seq=seqs[i], step=steps[i])
        r.duplicate = duplicates[i]
        if i in errors:
            r.code, r.error = errors[i]
            continue
        r.output.extend(outputs[i].tolist())
        if hidden is not None:
            r.hidden.extend(hidden[i].tolist())
        if cell is not None:
            r.cell.extend(cell[i].tolist())
        for name, rows in named:
            r.states.add(name=name, values=rows[i].tolist())
        r.model_version = versions[i]
    return response.SerializeToString()


@st.composite
def answers(draw: st.DrawFn) -> tuple:
    n = draw(st.integers(0, 6))
    width = draw(st.sampled_from([1, 3, 64]))
    rows = st.lists(st.lists(FLOATS, min_size=width, max_size=width), min_size=n, max_size=n)
    outputs = np.array(draw(rows), np.float32).reshape(n, width)
    with_state = draw(st.booleans())
    hidden = np.array(draw(rows), np.float32).reshape(n, width) if with_state else None
    cell = (
        np.array(draw(rows), np.float32).reshape(n, width)
        if with_state and draw(st.booleans())
        else None
    )
    named = []
    if with_state:
        for name in draw(st.lists(st.text(max_size=8), max_size=2)):
            k = draw(st.sampled_from([0, 1, 5]))
            lists = st.lists(st.lists(FLOATS, min_size=k, max_size=k), min_size=n, max_size=n)
            named.append((name, np.array(draw(lists), np.float32).reshape(n, k)))
    errors = draw(
        st.dictionaries(
            st.integers(0, max(n - 1, 0)) if n else st.nothing(),
            st.tuples(st.sampled_from([0, 3, 8, 13, 14, -1]), st.text(max_size=20)),
            max_size=n,
        )
    )
    return (
        draw(st.lists(IDS, min_size=n, max_size=n)),
        draw(st.lists(U64, min_size=n, max_size=n)),
        draw(st.lists(U64, min_size=n, max_size=n)),
        outputs,
        draw(st.lists(st.booleans(), min_size=n, max_size=n)),
        errors,
        hidden,
        cell,
        named,
        draw(st.lists(U64, min_size=n, max_size=n)),
    )


@settings(max_examples=300, deadline=None)
@given(answers())
def test_results_are_the_bytes_protobuf_writes(answer: tuple) -> None:
    written = encode_results(*answer)
    assert written == protobuf_results(*answer)
    assert len(pb.StepResponse.FromString(written).results) == len(answer[0])


@given(st.integers(1, 2**64 - 1) | st.integers(-(2**31), -1))
def test_varint_matches_protobuf(value: int) -> None:
    """uint64 (seq) up to 2**64 - 1, and negative int32 (code) as ten bytes."""
    message = pb.Result(seq=value) if value > 0 else pb.Result(code=value)
    assert message.SerializeToString()[1:] == varint(value)


@st.composite
def event_lists(draw: st.DrawFn) -> tuple[list[pb.Event], int]:
    size = draw(st.sampled_from([1, 2, 32]))
    n = draw(st.integers(1, BYTES_FROM + 4))  # both ways of reading them
    events = [
        pb.Event(
            session_id=draw(IDS),
            seq=draw(U64),
            values=draw(st.lists(FLOATS, min_size=size, max_size=size)),
            reset=draw(st.booleans()),
        )
        for _ in range(n)
    ]
    return events, size


@settings(max_examples=300, deadline=None)
@given(event_lists())
def test_event_values_are_the_values_sent(drawn: tuple[list[pb.Event], int]) -> None:
    events, size = drawn
    got = event_values(events, [ev.reset for ev in events], size)
    expected = np.array([list(ev.values) for ev in events], np.float32)
    np.testing.assert_array_equal(got, expected)
    assert got.dtype == np.float32 and got.shape == (len(events), size)


def with_unknown_field(event: pb.Event) -> pb.Event:
    """The event as a newer client might send it: with a field 15 this schema lacks."""
    return pb.Event.FromString(event.SerializeToString() + b"\x78\x2a")


def test_unknown_fields_after_the_values_are_not_read_as_values() -> None:
    n = BYTES_FROM + 2
    rng = np.random.default_rng(3)
    values = rng.standard_normal((n, 4)).astype(np.float32)
    events = [
        with_unknown_field(pb.Event(session_id=f"s{i}", values=v)) for i, v in enumerate(values)
    ]
    # Not discarded: the tag check sees the unknown field and the values are read one by one.
    np.testing.assert_array_equal(event_values(events, [False] * n, 4), values)


def unpacked_event(session_id: str, values: np.ndarray, unknown: bool) -> bytes:
    """An Event with its floats unpacked (legal on the wire) and, optionally, an unknown field."""
    sid = session_id.encode()
    body = b"\x0a" + varint(len(sid)) + sid
    for v in values.astype("<f4"):
        body += b"\x1d" + v.tobytes()  # field 3, wire type 5 (fixed32), one value per tag
    if unknown:
        body += b"\x78\x2a"
    return b"\x0a" + varint(len(body)) + body


async def test_events_in_any_legal_encoding_are_served_exactly(server: Server) -> None:
    """Unpacked floats and unknown fields, sent as raw bytes, give the reference outputs."""
    rng = np.random.default_rng(4)
    values = rng.standard_normal((4, 32)).astype(np.float32)
    ids = ["plain", "unknown", "ünïcode", "unknown-2"]
    raw = b"".join(unpacked_event(sid, v, unknown="unknown" in sid) for sid, v in zip(ids, values))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        step = channel.unary_unary(
            "/lstm_stream.v1.LstmStream/Step", request_serializer=None, response_deserializer=None
        )
        response = pb.StepResponse.FromString(await step(raw))
        stub = pb_grpc.LstmStreamStub(channel)
        again = await stub.Step(
            pb.StepRequest(events=[pb.Event(session_id=ids[1], values=values[0], reset=True)])
        )
    reference = Reference()
    assert [r.session_id for r in response.results] == ids
    for r, sid, v in zip(response.results, ids, values):
        assert r.code == 0 and r.step == 1
        np.testing.assert_allclose(r.output, reference.step(sid, v), rtol=1e-5, atol=1e-6)
    (r,) = again.results
    assert r.step == 2
    np.testing.assert_allclose(
        r.output, reference.step(ids[1], values[0], reset=True), rtol=1e-5, atol=1e-6
    )
