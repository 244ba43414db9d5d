"""The compiled wire codec: requests read as protobuf parses them, answers byte for byte."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from lstm_stream.v1 import lstm_stream_pb2 as pb
from lstm_stream.v1 import lstm_stream_pb2_grpc as pb_grpc
from service.api.codec import (
    MalformedBatch,
    StepRequestWire,
    encode_batch,
    encode_results,
    read_step_request,
    varint,
)
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


def as_written(answer: tuple) -> bytes:
    """``encode_results`` on an answer drawn as lists, with the columns the servicer passes."""
    ids, seqs, steps, outputs, duplicates, errors, hidden, cell, named, versions = answer
    states = [(n, rows) for n, rows in (("hidden", hidden), ("cell", cell)) if rows is not None]
    return encode_results(
        ids,
        np.array(seqs, np.uint64),
        np.array(steps, np.uint64),
        outputs,
        np.array(duplicates, np.bool_).view(np.uint8),
        errors,
        [*named, *states],  # in any order: hidden and cell have their own fields
        np.array(versions, np.uint64),
    )


@settings(max_examples=300, deadline=None)
@given(answers())
def test_results_are_the_bytes_protobuf_writes(answer: tuple) -> None:
    written = as_written(answer)
    assert written == protobuf_results(*answer)
    assert len(pb.StepResponse.FromString(written).results) == len(answer[0])


def test_results_without_seqs_leave_seq_out() -> None:
    written = encode_results(
        ["a"],
        None,
        np.array([3], np.uint64),
        np.ones((1, 2), np.float32),
        np.zeros(1, np.uint8),
        {},
        [],
        np.array([1], np.uint64),
    )
    (r,) = pb.StepResponse.FromString(written).results
    assert (r.session_id, r.seq, r.step, list(r.output), r.model_version) == ("a", 0, 3, [1, 1], 1)


def test_columns_of_another_length_are_refused() -> None:
    with pytest.raises(ValueError, match="rows"):
        encode_batch(
            np.zeros(2, np.uint64),
            np.zeros((3, 4), np.float32),
            np.zeros(2, np.int32),
            np.zeros(2, np.uint8),
            {},
            np.zeros(2, np.uint64),
        )


@st.composite
def batches(draw: st.DrawFn) -> tuple:
    n = draw(st.integers(0, 6))
    width = draw(st.sampled_from([0, 1, 3]))
    rows = st.lists(st.lists(FLOATS, min_size=width, max_size=width), min_size=n, max_size=n)
    codes = draw(st.lists(st.sampled_from([0, 0, 3, 8, 13, -1]), min_size=n, max_size=n))
    errors = {i: draw(st.text(max_size=12)) for i, c in enumerate(codes) if c}
    return (
        draw(st.lists(U64, min_size=n, max_size=n)),
        np.array(draw(rows), np.float32).reshape(n, width),
        codes,
        draw(st.lists(st.booleans(), min_size=n, max_size=n)),
        errors,
        draw(st.lists(U64, min_size=n, max_size=n)),
    )


@settings(max_examples=300, deadline=None)
@given(batches())
def test_result_batches_are_the_bytes_protobuf_writes(drawn: tuple) -> None:
    steps, outputs, codes, duplicates, errors, versions = drawn
    n = len(steps)
    written = encode_batch(
        np.array(steps, np.uint64),
        outputs,
        np.array(codes, np.int32),
        np.array(duplicates, np.bool_).view(np.uint8),
        errors,
        np.array(versions, np.uint64),
    )
    expected = pb.StepResponse(
        batch=pb.ResultBatch(
            steps=steps,
            outputs=outputs.astype("<f4").tobytes(),
            codes=codes,
            duplicates=duplicates,
            errors=[errors.get(i, "") for i in range(n)],
            model_versions=versions,
        )
    )
    assert written == expected.SerializeToString()


@given(st.integers(1, 2**64 - 1) | st.integers(-(2**31), -1))
def test_varint_matches_protobuf(value: int) -> None:
    """uint64 (seq) up to 2**64 - 1, and negative int32 (code) as ten bytes."""
    message = pb.Result(seq=value) if value > 0 else pb.Result(code=value)
    assert message.SerializeToString()[1:] == varint(value)


@st.composite
def step_requests(draw: st.DrawFn) -> pb.StepRequest:
    """Either form, with every field drawn, and events of several lengths."""
    n = draw(st.integers(0, 5))
    ids = draw(st.lists(IDS, min_size=n, max_size=n))
    request = pb.StepRequest(
        include_state=draw(st.booleans()),
        model=draw(IDS),
        model_version=draw(U64),
    )
    if draw(st.booleans()):
        values = draw(st.lists(FLOATS, max_size=12))
        request.batch.session_ids.extend(ids)
        request.batch.values = np.array(values, "<f4").tobytes()
        request.batch.seqs.extend(draw(st.lists(U64, max_size=n + 1)))
        request.batch.resets.extend(draw(st.lists(st.booleans(), max_size=n + 1)))
    else:
        for sid in ids:
            request.events.add(
                session_id=sid,
                seq=draw(U64),
                values=draw(st.lists(FLOATS, min_size=1, max_size=3)),
                reset=draw(st.booleans()),
            )
    return request


def assert_read_as_protobuf(wire: object, request: pb.StepRequest, size: int) -> None:
    """What the reader gives equals what protobuf parsed."""
    assert isinstance(wire, StepRequestWire)
    assert (wire.include_state, wire.model, wire.model_version) == (
        request.include_state,
        request.model,
        request.model_version,
    )
    assert wire.columnar == request.HasField("batch")
    if wire.columnar:
        batch = request.batch
        assert wire.session_ids == list(batch.session_ids)
        assert (wire.n_seqs, wire.n_resets) == (len(batch.seqs), len(batch.resets))
        assert wire.values_bytes == len(batch.values)
        if batch.seqs:
            assert wire.seqs is not None and wire.seqs.tolist() == list(batch.seqs)
        if batch.resets:
            assert wire.resets is not None and wire.resets.tolist() == list(batch.resets)
        n = len(batch.session_ids)
        fits = len(batch.values) == 4 * n * size
        if fits and len(batch.seqs) in (0, n) and len(batch.resets) in (0, n):
            values, bad = wire.values(size)
            assert bad is None
            assert values.tobytes() == batch.values
        else:
            with pytest.raises(MalformedBatch, match=r"^malformed batch: "):
                wire.values(size)
        return
    events = request.events
    assert wire.session_ids == [ev.session_id for ev in events]
    seqs = [ev.seq for ev in events]
    resets = [ev.reset for ev in events]
    assert (wire.seqs.tolist() if wire.seqs is not None else [0] * len(events)) == seqs
    assert (wire.resets.tolist() if wire.resets is not None else [False] * len(events)) == resets
    values, bad = wire.values(size)
    assert values.shape == (len(events), size) and values.dtype == np.float32
    for i, ev in enumerate(events):
        if len(ev.values) == size:
            assert values[i].tolist() == list(np.array(ev.values, np.float32))
            assert bad is None or i not in bad
        else:
            assert bad is not None
            assert bad[i] == f"event has {len(ev.values)} values; the model takes {size}"
            assert not values[i].any()


@settings(max_examples=300, deadline=None)
@given(step_requests(), st.sampled_from([1, 2, 3]))
def test_requests_read_as_protobuf_parses_them(request: pb.StepRequest, size: int) -> None:
    data = request.SerializeToString()
    assert_read_as_protobuf(read_step_request(data), pb.StepRequest.FromString(data), size)


def unpacked(request: pb.StepRequest) -> bytes:
    """The same request with every event's floats unpacked (legal on the wire)."""
    out = b""
    for ev in request.events:
        sid = ev.session_id.encode()
        body = (b"\x0a" + varint(len(sid)) + sid) if sid else b""
        if ev.seq:
            body += b"\x10" + varint(ev.seq)
        for v in np.array(ev.values, "<f4"):
            body += b"\x1d" + v.tobytes()  # field 3, wire type 5 (fixed32), one value per tag
        out += b"\x0a" + varint(len(body)) + body
    return out


@pytest.mark.parametrize(
    "legal",
    [
        "unpacked floats",
        "unknown fields",
        "values in two chunks",
        "two batches",
        "fields out of order",
    ],
)
def test_other_legal_encodings_mean_what_protobuf_says(legal: str) -> None:
    request = pb.StepRequest(
        events=[
            pb.Event(session_id="a", seq=4, values=[1.5, -2.0]),
            pb.Event(session_id="ü", values=[3.0, 4.0], reset=True),
        ],
        model="m",
    )
    data = request.SerializeToString()
    if legal == "unpacked floats":
        data = unpacked(request) + b"\x22\x01m"
    elif legal == "unknown fields":
        data = data + b"\x78\x2a" + b"\x82\x01\x02hi" + b"\x8d\x01\x00\x00\x00\x00"
    elif legal == "values in two chunks":
        body = b"\x0a\x01a\x1a\x04" + np.float32(1.5).tobytes() + b"\x1a\x04"
        body += np.float32(-2.0).tobytes()
        data = b"\x0a" + varint(len(body)) + body
    elif legal == "two batches":
        first = pb.EventBatch(session_ids=["a"], values=b"\x00" * 4).SerializeToString()
        second = pb.EventBatch(session_ids=["b"], seqs=[7, 8]).SerializeToString()
        data = b"\x1a" + varint(len(first)) + first + b"\x1a" + varint(len(second)) + second
    elif legal == "fields out of order":
        data = b"\x22\x01m" + data[::-1][::-1]  # model first, then the events
    assert_read_as_protobuf(read_step_request(data), pb.StepRequest.FromString(data), 2)


@pytest.mark.parametrize(
    "garbage",
    [b"\xff\xff\xff", b"\x0a\x05ab", b"\x22\x02\xc3\x28", b"\x0a\x03\x0a\x01\xff"],
    ids=["cut varint", "cut event", "model not UTF-8", "id not UTF-8"],
)
def test_bytes_that_are_not_a_request_read_as_none(garbage: bytes) -> None:
    with pytest.raises(DecodeError):
        pb.StepRequest.FromString(garbage)
    assert read_step_request(garbage) is None


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
