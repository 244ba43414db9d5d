"""The client library (``lstm_stream.Client``/``AsyncClient``) against the real server."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import pytest

from lstm_bench import procs
from lstm_stream import AsyncClient, Client, LstmError
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

    def restart() -> None:
        first.proc.kill()  # type: ignore[union-attr]
        first.proc.wait()  # type: ignore[union-attr]
        extra = ["--device", DEVICE, "--state-store", db, "--port", str(port)]
        holder.append(procs.start("server", None, extra))
        restarted.set()

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
