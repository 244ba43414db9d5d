"""The Open Inference Protocol through our own stubs: tenants and typed contents."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

from lstm_stream.oip.v2 import inference_pb2 as oip
from lstm_stream.oip.v2 import inference_pb2_grpc as oip_grpc
from lstm_stream.v1 import lstm_stream_pb2 as pb
from lstm_stream.v1 import lstm_stream_pb2_grpc as pb_grpc
from tests.conftest import ServerFactory
from tests.service.reference import Reference, events

ALPHA = "alpha-token-7f3c9a1e5b2d4f60"
BRAVO = "bravo-token-0e8d6c4b2a197531"


def infer(
    sequence: str, rows: np.ndarray, start: bool = False, raw: bool = True
) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name="lstm", id="r")
    request.parameters["sequence_id"].string_param = sequence
    request.parameters["sequence_start"].bool_param = start
    tensor = request.inputs.add(name="event", datatype="FP32", shape=list(rows.shape))
    if raw:
        request.raw_input_contents.append(rows.astype("<f4").tobytes())
    else:
        tensor.contents.fp32_contents.extend(rows.ravel().tolist())
    return request


async def test_typed_contents_in_typed_contents_out(start_server: ServerFactory) -> None:
    server = await start_server()
    x = events(np.random.default_rng(1), 2)
    ref = Reference()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        typed = await stub.ModelInfer(infer("t", x, start=True, raw=False))
        assert not typed.raw_output_contents and typed.id == "r"
        out = np.array(typed.outputs[0].contents.fp32_contents).reshape(2, 64)
        for k in range(2):
            np.testing.assert_allclose(out[k], ref.step("t", x[k]), atol=1e-5)


async def test_tenants_apply_to_the_triton_api(start_server: ServerFactory, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{ALPHA} tenant-a\n{BRAVO} tenant-b\n")
    server = await start_server(auth_tokens=str(tokens))
    x = events(np.random.default_rng(2), 1)
    a = (("authorization", f"Bearer {ALPHA}"),)
    b = (("authorization", f"Bearer {BRAVO}"),)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ModelInfer(infer("seq", x, start=True))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        await stub.ModelInfer(infer("seq", x, start=True), metadata=a)
        # B does not see A's sequence: continuing it without START is refused.
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ModelInfer(infer("seq", x), metadata=b)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        native = pb_grpc.LstmStreamStub(channel)
        assert (await native.GetSession(pb.SessionRef(session_id="seq"), metadata=a)).step == 1
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await native.GetSession(pb.SessionRef(session_id="seq"), metadata=b)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
