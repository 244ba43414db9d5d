"""The client library (``lstm_stream.Client``/``AsyncClient``) against the real server."""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from lstm_bench import procs
from lstm_stream import AsyncClient, Client, LstmError, ShardedClient, Unreachable
from service.server import Server
from tests.conftest import DEVICE
from tests.service.reference import Reference, events


@pytest.mark.parametrize("form", ["columnar", "events"])
async def test_sync_client_both_forms_numpy_round_trip(server: Server, form: str) -> None:
    x = events(np.random.default_rng(1), 6)

    def use() -> None:
        ref = Reference()
        with Client(f"127.0.0.1:{server.port}", form=form) as client:
            out = client.step("a", x[0])
            np.testing.assert_allclose(out, ref.step("a", x[0]), atol=1e-5)
            r = client.step_many(["a", "b", "a"], x[1:4])
            assert r.ok and r.steps.tolist() == [2, 1, 3] and r.seqs.tolist() == [2, 1, 3]
            for i, sid in enumerate(["a", "b", "a"]):
                np.testing.assert_allclose(r.outputs[i], ref.step(sid, x[1 + i]), atol=1e-5)
            bad = client.step_many(["a"], np.full((1, 32), np.nan, np.float32))
            assert bad.codes.tolist() == [3] and "NaN" in bad.errors[0]
            with pytest.raises(LstmError) as info:
                client.step("a", np.full(32, np.inf, np.float32))
            assert "NaN or Inf" in info.value.message
            assert client.get_session("a").step == 3  # type: ignore[union-attr]
            assert client.get_session("nobody") is None
            assert client.model_info().event_size == 32
            assert client.health() == "SERVING"
            client.delete_session("b")
            assert client.get_session("b") is None

    await asyncio.to_thread(use)


async def test_a_new_client_continues_seq_after_the_server_s_last_seq(server: Server) -> None:
    x = events(np.random.default_rng(2), 3)

    def use() -> None:
        address = f"127.0.0.1:{server.port}"
        with Client(address) as first:
            first.step_many(["s", "s"], x[:2])
        with Client(address) as second:  # knows nothing: learns last_seq = 2 from the server
            r = second.step_many(["s"], x[2:3])
            assert r.seqs.tolist() == [3] and not r.duplicates.any() and r.steps.tolist() == [3]

    await asyncio.to_thread(use)


async def test_async_client_streams_in_order(server: Server) -> None:
    rng = np.random.default_rng(3)
    batches = [([f"u{i}" for i in range(8)], events(rng, 8)) for _ in range(20)]
    ref = Reference()
    async with AsyncClient(f"127.0.0.1:{server.port}", window=4) as client:
        n = 0
        async for r in client.stream(batches):
            ids, values = batches[n]
            for i, sid in enumerate(ids):
                np.testing.assert_allclose(r.outputs[i], ref.step(sid, values[i]), atol=1e-5)
            n += 1
        assert n == 20
        out = await client.step("u0", batches[0][1][0])
        np.testing.assert_allclose(out, ref.step("u0", batches[0][1][0]), atol=1e-5)
        assert (await client.model_info()).output_size == 64
        assert await client.health() == "SERVING"


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_stream_resumes_after_the_server_restarts(tmp_path: Path, kind: str) -> None:
    """SQLite store; the server is killed mid-stream and restarted on the same port and file:
    the client reconnects, re-sends what was not answered, and the end equals an
    uninterrupted run."""
    rng = np.random.default_rng(4)
    ids = [f"r{i}" for i in range(16)]
    batches = [(ids, events(rng, 16)) for _ in range(120)]
    db = f"sqlite://{tmp_path / 's.db'}"
    first = procs.start("server", None, ["--device", DEVICE, "--state-store", db])
    port = first.port
    assert first.proc is not None
    answered = 0
    restarted = threading.Event()
    finished = threading.Event()

    def restart() -> None:
        first.proc.kill()  # type: ignore[union-attr]
        first.proc.wait()  # type: ignore[union-attr]
        extra = ["--device", DEVICE, "--state-store", db, "--port", str(port)]
        holder.append(procs.start("server", None, extra))
        restarted.set()
        finished.wait(120)  # the server dies with the thread that started it

    holder: list[procs.Target] = []

    def on_result(k: int) -> None:
        nonlocal answered
        answered = k + 1
        if k == 40:
            threading.Thread(target=restart).start()

    try:
        if kind == "sync":

            def run() -> list[np.ndarray]:
                outs: list[np.ndarray] = []
                with Client(f"127.0.0.1:{port}", window=4) as client:
                    for k, r in enumerate(client.stream(batches)):
                        assert r.ok, r.errors
                        outs.append(np.where(r.duplicates[:, None], np.nan, r.outputs))
                        on_result(k)
                return outs

            outputs = await asyncio.to_thread(run)
        else:
            outputs = []
            async with AsyncClient(f"127.0.0.1:{port}", window=4) as client:
                k = 0
                async for r in client.stream(batches):
                    assert r.ok, r.errors
                    outputs.append(np.where(r.duplicates[:, None], np.nan, r.outputs))
                    on_result(k)
                    k += 1
        assert restarted.is_set() and answered == 120
        ref = Reference()
        for k, (batch_ids, values) in enumerate(batches):
            expected = [ref.step(sid, values[i]) for i, sid in enumerate(batch_ids)]
            # Every event applied in this run answers its own output; one re-sent after the
            # restart that had already been applied comes back duplicate (NaN here).
            fresh = ~np.isnan(outputs[k][:, 0])
            np.testing.assert_allclose(outputs[k][fresh], np.array(expected)[fresh], atol=1e-5)
        with Client(f"127.0.0.1:{port}") as client:
            for sid in ids:
                s = client.get_session(sid)
                assert s is not None and s.step == s.last_seq == 120
                np.testing.assert_allclose(s.hidden, ref.hidden[sid], atol=1e-5)
    finally:
        for target in (first, *holder):
            target.stop()
        finished.set()


@pytest.mark.parametrize("form", ["columnar", "events"])
async def test_explicit_and_automatic_seqs_mix_and_nothing_is_applied_twice(
    server: Server, form: str
) -> None:
    x = events(np.random.default_rng(6), 8)

    def use() -> None:
        ref = Reference()
        with Client(f"127.0.0.1:{server.port}", form=form) as client:
            # An explicit seq as it is; the same again (same request) is a duplicate;
            # an automatic one comes after the highest so far.
            r = client.step_many(["m", "m", "m"], x[:3], seqs=[5, 5, 0])
            assert r.seqs.tolist() == [5, 5, 6] and r.duplicates.tolist() == [False, True, False]
            assert r.steps.tolist() == [1, 1, 2]
            np.testing.assert_allclose(r.outputs[0], ref.step("m", x[0]), atol=1e-5)
            np.testing.assert_allclose(r.outputs[2], ref.step("m", x[2]), atol=1e-5)
            # An explicit seq at or below one already sent is a duplicate, never re-applied.
            out = client.step("m", x[3], seq=6)
            np.testing.assert_allclose(out, r.outputs[2])
            batches = [(["m"], x[4:5], None, [9]), (["m"], x[5:6]), (["m"], x[6:7], [False], [10])]
            answers = list(client.stream(batches))
            assert [int(a.seqs[0]) for a in answers] == [9, 10, 10]
            assert [bool(a.duplicates[0]) for a in answers] == [False, False, True]
            for k in (4, 5):
                np.testing.assert_allclose(
                    answers[k - 4].outputs[0], ref.step("m", x[k]), atol=1e-5
                )
            session = client.get_session("m")
            assert session is not None and (session.step, session.last_seq) == (4, 10)
            with pytest.raises(ValueError, match="seqs must have 1 entries"):
                client.step_many(["m"], x[:1], seqs=[1, 2])

    await asyncio.to_thread(use)


async def test_async_client_takes_explicit_seqs(server: Server) -> None:
    x = events(np.random.default_rng(9), 3)
    async with AsyncClient(f"127.0.0.1:{server.port}") as client:
        r = await client.step_many(["n", "n"], x[:2], seqs=[3, 3])
        assert r.duplicates.tolist() == [False, True]
        answers = [a async for a in client.stream([(["n"], x[2:3], None, [0])])]
        assert answers[0].seqs.tolist() == [4] and answers[0].steps.tolist() == [2]


@pytest.mark.parametrize(
    ("address", "reason"),
    [("127.0.0.1:1", "connection refused"), ("lstm.invalid:50051", "name does not resolve")],
)
async def test_a_server_never_reached_fails_after_connect_timeout_in_words(
    address: str, reason: str
) -> None:
    # .invalid never resolves (RFC 6761); the client answers so without a lookup.
    def use() -> float:
        started = time.monotonic()
        with Client(address, retry_for=30, connect_timeout=0.5) as client:
            with pytest.raises(Unreachable) as info:
                client.model_info()
            assert str(info.value) == f"cannot reach {address} ({reason})"
            assert info.value.code == grpc.StatusCode.UNAVAILABLE and info.value.reason == reason
            with pytest.raises(Unreachable):
                next(client.stream([(["s"], np.zeros((1, 32), np.float32))]))
        return time.monotonic() - started

    assert await asyncio.to_thread(use) < 4.5
    started = time.monotonic()
    async with AsyncClient(address, retry_for=30, connect_timeout=0.5) as client:
        with pytest.raises(Unreachable, match=rf"cannot reach {address} \({reason}\)"):
            await client.model_info()
    assert time.monotonic() - started < 3


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_server_that_never_answers_the_handshake_times_out(kind: str) -> None:
    with socket.socket() as silent:  # the kernel accepts; nothing speaks HTTP/2
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(Unreachable, match=rf"^cannot reach {address} \(timed out\)$"):
            if kind == "sync":

                def use() -> None:
                    with Client(address, connect_timeout=0.5) as client:
                        client.get_session("s")

                await asyncio.to_thread(use)
            else:
                async with AsyncClient(address, connect_timeout=0.5) as client:
                    await client.get_session("s")
        assert time.monotonic() - started < 3


async def test_an_address_needs_a_port() -> None:
    for address, words in (("127.0.0.1", "has no port"), ("::1", "[ADDRESS]:PORT")):
        with pytest.raises(ValueError, match=re.escape(words)):
            Client(address)
        with pytest.raises(ValueError, match=re.escape(words)):
            AsyncClient(address)
    with Client("[::1]:50051"), Client("unix:/nowhere/socket"):
        pass  # a bracketed IPv6 address and a gRPC target with a scheme are taken


async def test_values_beyond_float32_are_refused_without_a_warning(server: Server) -> None:
    def use() -> None:
        with Client(f"127.0.0.1:{server.port}") as client, warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(ValueError, match="values out of float32 range"):
                client.step_many(["f"], np.full((1, 32), 1e39))
            assert client.get_session("f") is None

    await asyncio.to_thread(use)


async def test_every_result_says_its_model_version(server: Server) -> None:
    x = events(np.random.default_rng(10), 3)

    def use() -> None:
        address = f"127.0.0.1:{server.port}"
        with Client(address, form="events") as client:
            assert client.step_many(["v"], x[:1]).versions.tolist() == [1]
        with ShardedClient([address]) as sharded:
            assert sharded.step_many(["v", "w"], x[1:]).versions.tolist() == [1, 1]

    await asyncio.to_thread(use)


def _failing_batches(prefix: str, x: np.ndarray) -> Iterator[tuple[list[str], np.ndarray]]:
    """Two good batches, one whose values do not match its ids, and one that must never go."""
    yield [f"{prefix}a"], x[0:1]
    yield [f"{prefix}b"], x[1:2]
    yield [f"{prefix}c"], x[2:4]  # two rows of values for one session id
    yield [f"{prefix}d"], x[4:5]


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_batch_that_cannot_be_sent_ends_the_stream_with_its_own_error(
    server: Server, kind: str
) -> None:
    """The batches before it are answered and yielded; then the stream raises the batch's
    own error (not gRPC's "Exception iterating requests", not a hang); nothing after it
    is sent."""
    x = events(np.random.default_rng(11), 5)
    ref = Reference()
    address = f"127.0.0.1:{server.port}"
    got: list[np.ndarray] = []

    def use_sync() -> None:
        with Client(address, window=4) as client:
            with pytest.raises(ValueError, match=r"values must be \[1, E\]; got \[2, 32\]"):
                for r in client.stream(_failing_batches(kind, x)):
                    got.append(r.outputs[0])
            assert client.get_session(f"{kind}c") is None
            assert client.get_session(f"{kind}d") is None

    async def use_async() -> None:
        async with AsyncClient(address, window=4) as client:
            with pytest.raises(ValueError, match=r"values must be \[1, E\]; got \[2, 32\]"):
                async for r in client.stream(_failing_batches(kind, x)):
                    got.append(r.outputs[0])
            assert await client.get_session(f"{kind}c") is None
            assert await client.get_session(f"{kind}d") is None

    if kind == "sync":
        await asyncio.to_thread(use_sync)
    else:
        await asyncio.wait_for(use_async(), 30)  # before the fix: no answer, ever
    assert len(got) == 2
    np.testing.assert_allclose(got[0], ref.step(f"{kind}a", x[0]), atol=1e-5)
    np.testing.assert_allclose(got[1], ref.step(f"{kind}b", x[1]), atol=1e-5)


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_an_iterable_that_raises_ends_the_stream_with_that_error(
    server: Server, kind: str
) -> None:
    x = events(np.random.default_rng(12), 2)

    def source() -> Iterator[tuple[list[str], np.ndarray]]:
        yield [f"{kind}-it"], x[0:1]
        raise OSError("the input file went away")

    address = f"127.0.0.1:{server.port}"
    got: list[Any] = []

    def use_sync() -> None:
        with Client(address) as client, pytest.raises(OSError, match="went away"):
            for r in client.stream(source()):
                got.append(r)

    async def use_async() -> None:
        async with AsyncClient(address) as client:
            with pytest.raises(OSError, match="went away"):
                async for r in client.stream(source()):
                    got.append(r)

    if kind == "sync":
        await asyncio.to_thread(use_sync)
    else:
        await asyncio.wait_for(use_async(), 30)
    assert [r.steps.tolist() for r in got] == [[1]]
