"""A repository version that failed to load is tried again when its files change (poll,
SIGHUP, explicit load); a file still being written is "not settled yet", not a failure."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import grpc
import numpy as np

from lstm_stream.oip.v2 import inference_pb2 as oip
from lstm_stream.oip.v2 import inference_pb2_grpc as oip_grpc
from lstm_stream.v1 import lstm_stream_pb2 as pb
from lstm_stream.v1 import lstm_stream_pb2_grpc as pb_grpc
from model_export import lstm
from model_export.onnx_export import build_model
from service.server import Server
from tests.conftest import ServerFactory
from tests.service.client import Ev, request
from tests.service.test_lifecycle import start_subprocess
from tests.service.versions import E, add_file, parameters, repository

CORRUPT = b"this is not an ONNX model"


def export(version: int) -> bytes:
    """Version ``version``'s valid step model, as lstm-export writes it."""
    return build_model(parameters(version)).SerializeToString()


def overwrite(repo: Path, model: str, version: int, data: bytes) -> None:
    """Replace a version's model file in place, as ``cp`` over it or an editor would."""
    target = repo / model / str(version) / "model.onnx"
    aside = repo / f".{model}-{version}.onnx"
    aside.write_bytes(data)
    os.replace(aside, target)


async def listed(stub: pb_grpc.LstmStreamStub) -> dict[int, tuple[str, str]]:
    """version -> (state, reason) of model m, as ListModels shows them."""
    models = await stub.ListModels(pb.ListModelsRequest())
    return {v.version: (v.state, v.reason) for v in models.versions if v.model == "m"}


async def until_listed(
    stub: pb_grpc.LstmStreamStub, version: int, state: str, words: str = "", timeout: float = 30
) -> str:
    """Wait until ``version`` is in ``state`` with ``words`` in its reason; the reason."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        got = (await listed(stub)).get(version, ("", ""))
        if got[0] == state and words in got[1]:
            return got[1]
        assert asyncio.get_running_loop().time() < deadline, f"version {version}: {got}"
        await asyncio.sleep(0.02)


async def served_by(stub: pb_grpc.LstmStreamStub, session: str, version: int) -> None:
    """A new session's first answer comes from ``version`` and equals its reference."""
    x = np.linspace(-1, 1, E).astype(np.float32)
    result = (await stub.Step(request([Ev(session, x)]))).results[0]
    assert (result.code, result.model_version) == (0, version), result.error
    zeros = np.zeros(parameters(version).hidden_size)
    h, _ = lstm.step(x.astype(np.float64), zeros, zeros, parameters(version))
    np.testing.assert_allclose(result.output, h, atol=1e-5)


def load_failures(server: Server) -> float:
    value = server.metrics.registry.get_sample_value(
        "lstm_model_load_failures_total", {"model": "m"}
    )
    return value or 0.0


async def test_poll_loads_a_failed_version_once_a_valid_export_overwrites_it(
    tmp_path: Path, start_server: ServerFactory
) -> None:
    repo = repository(tmp_path / "repo", "m", "reset")
    server = await start_server(
        model_repository=str(repo), model_control="poll", repository_poll_secs=0.05
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.LstmStreamStub(channel)
        add_file(repo, "m", 2, CORRUPT)
        reason = await until_listed(stub, 2, "UNAVAILABLE", "load failed")
        assert "INVALID_PROTOBUF" in reason
        await asyncio.sleep(0.5)  # ten scans of the same files: not tried again
        assert load_failures(server) == 1
        await served_by(stub, "before", 1)

        overwrite(repo, "m", 2, export(2))
        await until_listed(stub, 2, "READY")
        await served_by(stub, "after", 2)
        assert load_failures(server) == 1

        # A folder moved out and back in is tried again, even with the same bad file.
        add_file(repo, "m", 3, CORRUPT)
        await until_listed(stub, 3, "UNAVAILABLE", "load failed")
        os.replace(repo / "m" / "3", tmp_path / "3")
        await until_listed(stub, 3, "UNAVAILABLE", "not in the repository")
        os.replace(tmp_path / "3", repo / "m" / "3")
        await until_listed(stub, 3, "UNAVAILABLE", "load failed")
        assert load_failures(server) == 3


async def test_a_half_written_file_is_not_settled_yet_and_loads_once_complete(
    tmp_path: Path, start_server: ServerFactory
) -> None:
    """A copy in progress: LOADING with "not settled yet" (not a failure, not counted)
    while the file grows between scans; it serves once the copy completes."""
    repo = repository(tmp_path / "repo", "m", "reset")
    server = await start_server(
        model_repository=str(repo), model_control="poll", repository_poll_secs=0.5
    )
    data = export(2)
    third = len(data) // 3
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.LstmStreamStub(channel)
        (repo / "m" / "2").mkdir()
        with open(repo / "m" / "2" / "model.onnx", "wb", buffering=0) as copy:
            copy.write(data[:third])
            reason = await until_listed(stub, 2, "LOADING", f"({third} bytes)")
            assert reason.startswith("not settled yet: m/2/model.onnx") and "load failed" in reason
            assert reason.endswith("tried again at the next scan")
            copy.write(data[third : 2 * third])  # still growing at the next scan
            await until_listed(stub, 2, "LOADING", f"({2 * third} bytes)")
            assert load_failures(server) == 0
            await served_by(stub, "meanwhile", 1)
            copy.write(data[2 * third :])
        await until_listed(stub, 2, "READY")
        await served_by(stub, "after", 2)
        assert load_failures(server) == 0


async def test_explicit_load_tries_a_failed_version_again(
    tmp_path: Path, start_server: ServerFactory
) -> None:
    repo = repository(tmp_path / "repo", "m", "reset")
    add_file(repo, "m", 2, CORRUPT)
    os.utime(repo / "m" / "2" / "model.onnx", (1e9, 1e9))  # long there: a plain failure
    server = await start_server(model_repository=str(repo), model_control="explicit")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.LstmStreamStub(channel)
        admin = oip_grpc.GRPCInferenceServiceStub(channel)
        await until_listed(stub, 2, "UNAVAILABLE", "load failed")
        try:
            await admin.RepositoryModelLoad(oip.RepositoryModelLoadRequest(model_name="m"))
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "version 2: load failed" in (exc.details() or "")
        else:
            raise AssertionError("loading a corrupt version succeeded")
        overwrite(repo, "m", 2, export(2))
        await admin.RepositoryModelLoad(oip.RepositoryModelLoadRequest(model_name="m"))
        assert (await listed(stub))[2][0] == "READY"
        await served_by(stub, "after", 2)


async def test_sighup_loads_a_failed_version_once_a_valid_export_overwrites_it(
    tmp_path: Path,
) -> None:
    """--model-control none: the corrupt file fails (after one more look, since it was just
    written), SIGHUP on the same files changes nothing, SIGHUP after the overwrite loads."""
    repo = repository(tmp_path / "repo", "m", "reset")
    proc, port = start_subprocess("--model-repository", str(repo), "--session-ttl", "0")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.LstmStreamStub(channel)
            add_file(repo, "m", 2, CORRUPT)
            proc.send_signal(signal.SIGHUP)
            await until_listed(stub, 2, "UNAVAILABLE", "load failed")
            proc.send_signal(signal.SIGHUP)
            await asyncio.sleep(0.3)
            assert (await listed(stub))[2][0] == "UNAVAILABLE"
            await served_by(stub, "before", 1)

            overwrite(repo, "m", 2, export(2))
            proc.send_signal(signal.SIGHUP)
            await until_listed(stub, 2, "READY")
            await served_by(stub, "after", 2)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
