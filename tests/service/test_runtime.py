"""The runtime's I/O contract check and device choice, without a network."""

from __future__ import annotations

import asyncio
import ctypes.util
import logging
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from lstm_stream.v1 import lstm_stream_pb2 as pb
from lstm_stream.v1 import lstm_stream_pb2_grpc as pb_grpc
from model_export.lstm import Parameters, step
from model_export.onnx_export import build_model
from service.runtime import (
    CPU,
    EMBEDDED_SOURCE,
    CudaOptions,
    DeviceUnavailableError,
    ModelContractError,
    Runtime,
    cuda_provider_options,
    load_model_bytes,
    parse_device,
    probe_cuda,
    providers_for,
)
from tests.conftest import DEVICE, ServerFactory
from tests.service.models import lying_model


def model_bytes(inputs, outputs, nodes, initializer=()) -> bytes:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializer))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def tensor(name: str, shape: list, kind: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, kind, shape)


def identity_model(**change: object) -> bytes:
    """event -> output; state -> state_out, each an Identity; ``change`` swaps one value info."""
    values = {
        "event": tensor("event", ["batch", 4]),
        "state": tensor("state", ["batch", 3]),
        "output": tensor("output", ["batch", 4]),
        "state_out": tensor("state_out", ["batch", 3]),
    }
    values.update(change)  # type: ignore[arg-type]
    names = {k: v.name for k, v in values.items()}  # type: ignore[attr-defined]
    nodes = [
        helper.make_node("Identity", [names["event"]], [names["output"]]),
        helper.make_node("Identity", [names["state"]], [names["state_out"]]),
    ]
    return model_bytes(
        [values["event"], values["state"]], [values["output"], values["state_out"]], nodes
    )


def test_generic_state_contract() -> None:
    runtime = Runtime(identity_model(), "identity.onnx", "cpu")
    assert runtime.spec.state_names == ("state",)
    assert runtime.spec.state_sizes == (3,)
    assert (runtime.spec.event_size, runtime.spec.output_size) == (4, 4)
    output, (state,) = runtime.run(np.ones((2, 4), np.float32), [np.full((2, 3), 7, np.float32)])
    assert output.shape == (2, 4) and state.tolist() == [[7, 7, 7]] * 2


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"event": tensor("x", ["batch", 4])}, "no input named 'event'"),
        ({"output": tensor("y", ["batch", 4])}, "no output named 'output'"),
        (
            {"state_out": tensor("state_next", ["batch", 3])},
            "state input 'state' has no matching output 'state_out'",
        ),
        (
            {
                "event": tensor("event", ["batch", 4], TensorProto.DOUBLE),
                "output": tensor("output", ["batch", 4], TensorProto.DOUBLE),
            },
            "input 'event' is tensor(double); expected tensor(float)",
        ),
        (
            {"event": tensor("event", [1, 4]), "output": tensor("output", [1, 4])},
            "fixed batch dimension 1",
        ),
        (
            {"event": tensor("event", ["batch", "e"]), "output": tensor("output", ["batch", "e"])},
            "expected [batch, n] with a fixed n",
        ),
    ],
)
def test_contract_violations_are_named(change: dict, message: str) -> None:
    with pytest.raises(ModelContractError) as info:
        Runtime(identity_model(**change), "bad.onnx", "cpu")
    assert message in str(info.value)
    assert "bad.onnx" in str(info.value)


def test_state_width_mismatch() -> None:
    with pytest.raises(ModelContractError, match="'state_out' has width 5; 'state' has 3"):
        Runtime(
            model_bytes(
                [tensor("event", ["batch", 4]), tensor("state", ["batch", 3])],
                [tensor("output", ["batch", 4]), tensor("state_out", ["batch", 5])],
                [
                    helper.make_node("Identity", ["event"], ["output"]),
                    helper.make_node("Pad", ["state", "pads"], ["state_out"]),
                ],
                [onnx.numpy_helper.from_array(np.array([0, 0, 0, 2], np.int64), "pads")],
            ),
            "bad.onnx",
            "cpu",
        )


def test_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    data, source = load_model_bytes(str(tmp_path / "junk.onnx"))
    with pytest.raises(ModelContractError, match="ONNX Runtime cannot load"):
        Runtime(data, source, "cpu")
    with pytest.raises(ModelContractError, match="cannot read model"):
        load_model_bytes(str(tmp_path / "missing.onnx"))


def test_exported_file_runs_like_the_reference(tmp_path: Path) -> None:
    p = Parameters.random(5, 6, seed=2)
    onnx.save_model(build_model(p), tmp_path / "m.onnx")
    runtime = Runtime(*load_model_bytes(str(tmp_path / "m.onnx")), "cpu")
    assert runtime.spec.state_names == ("hidden", "cell")
    x = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    z = np.zeros((3, 6), np.float32)
    output, (_, c) = runtime.run(x, [z, z])
    ref_h, ref_c = step(x, z, z, p)
    np.testing.assert_allclose(output, ref_h, atol=1e-5)
    np.testing.assert_allclose(c, ref_c, atol=1e-5)


def test_on_the_cpu_the_binding_is_called_directly_with_the_public_calls_results() -> None:
    """Runtime skips InferenceSession.run's per-call checks on the CPU provider (its binding,
    ``_sess``); the results are the public call's, bit for bit, and a bad feed still fails."""
    runtime = Runtime(*load_model_bytes(None), "cpu")
    assert runtime._run.__self__ is runtime._session._sess  # type: ignore[attr-defined]
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 32)).astype(np.float32)
    h, c = (rng.standard_normal((4, 64)).astype(np.float32) for _ in range(2))
    output, states = runtime.run(x, [h, c])
    public = runtime._session.run(
        ["output", "hidden_out", "cell_out"], {"event": x, "hidden": h, "cell": c}
    )
    for got, expected in zip([output, *states], public):
        np.testing.assert_array_equal(got, expected)
    with pytest.raises(Exception, match=r"(?i)type"):
        runtime.run(x.astype(np.float64), [h, c])


def test_a_batch_of_one_through_the_bound_arrays_is_runs_result_bit_for_bit() -> None:
    """``run_one`` (the arrays bound to ONNX Runtime once) gives ``run``'s results for
    one event after another, leaves its inputs as they were, and fails a result of
    another shape than declared as ``run`` does."""
    runtime = Runtime(*load_model_bytes(None), "cpu")
    rng = np.random.default_rng(4)
    for _ in range(3):
        x = rng.standard_normal((1, 32)).astype(np.float32)
        h, c = (rng.standard_normal((1, 64)).astype(np.float32) for _ in range(2))
        kept = [x.copy(), h.copy(), c.copy()]
        expected_output, expected_states = runtime.run(x, [h, c])
        output, states = runtime.run_one(x, [h, c])
        for got, expected in zip([output, *states], [expected_output, *expected_states]):
            assert got.shape == (1, 64)
            np.testing.assert_array_equal(got, expected)
        for array, before in zip((x, h, c), kept):
            np.testing.assert_array_equal(array, before)
    honest = Runtime(identity_model(), "identity.onnx", "cpu")  # one state, 3 wide
    out, (state,) = honest.run_one(np.ones((1, 4), np.float32), [np.full((1, 3), 2.0, np.float32)])
    assert out.tolist() == [[1.0] * 4] and state.tolist() == [[2.0] * 3]
    liar = Runtime(lying_model(), "lying.onnx", "cpu")
    x = np.full((1, 2), 3.0, np.float32)  # state_out 3 wide where 2 are declared
    with pytest.raises(Exception):  # noqa: B017  (ONNX Runtime's own error type)
        liar.run(x, [np.zeros((1, 2), np.float32)])
    with pytest.raises(Exception):  # noqa: B017
        liar.run_one(x, [np.zeros((1, 2), np.float32)])


def test_embedded_default() -> None:
    data, source = load_model_bytes(None)
    assert source == EMBEDDED_SOURCE
    runtime = Runtime(data, source, "cpu")
    runtime.warm_up(64)
    assert runtime.spec.metadata["event_size"] == "32"


def test_cpu_and_auto_without_cuda_run_on_the_cpu() -> None:
    for device in ("cpu", "auto"):
        runtime = Runtime(identity_model(), "identity.onnx", device)
        assert (runtime.provider, runtime.device) == ("CPUExecutionProvider", "cpu")


@pytest.mark.parametrize(
    ("device", "kind", "index"),
    [("auto", "auto", 0), ("cpu", "cpu", 0), ("cuda", "cuda", 0), ("cuda:3", "cuda", 3)],
)
def test_parse_device(device: str, kind: str, index: int) -> None:
    assert parse_device(device) == (kind, index)


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:-1", "cuda:x", "cpu:0", "CUDA", "cuda:٣"])
def test_parse_device_refuses(device: str) -> None:
    with pytest.raises(ValueError, match="--device must be auto, cpu, cuda or cuda:N"):
        parse_device(device)


def test_cuda_provider_options_are_set_on_purpose() -> None:
    with_cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    providers = providers_for("cuda:1", with_cuda, CudaOptions(mem_limit=8 << 30))
    assert providers == [
        (
            "CUDAExecutionProvider",
            {
                "device_id": "1",
                "use_tf32": "0",
                "arena_extend_strategy": "kSameAsRequested",
                "cudnn_conv_algo_search": "HEURISTIC",
                "enable_cuda_graph": "0",
                "gpu_mem_limit": str(8 << 30),
            },
        ),
        "CPUExecutionProvider",
    ]
    # Defaults: device 0, TF32 off, no memory limit; --cuda-tf32 turns it on.
    (_, options), _ = providers_for("cuda", with_cuda)  # type: ignore[misc]
    assert options["device_id"] == "0" and options["use_tf32"] == "0"
    assert "gpu_mem_limit" not in options
    assert cuda_provider_options(0, CudaOptions(tf32=True))["use_tf32"] == "1"
    # auto takes CUDA when the build has it, and only then; cpu never does.
    assert providers_for("auto", with_cuda)[0][0] == "CUDAExecutionProvider"
    assert providers_for("auto", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert providers_for("cpu", with_cuda) == ["CPUExecutionProvider"]


def test_cuda_without_a_cuda_build_is_an_error_not_a_cpu_run() -> None:
    with pytest.raises(DeviceUnavailableError) as info:
        providers_for("cuda:1", ["AzureExecutionProvider", "CPUExecutionProvider"])
    assert str(info.value).startswith("--device cuda:1: this onnxruntime build has no CUDA")
    assert "\n" not in str(info.value)


@pytest.mark.skipif(DEVICE == "cuda", reason="checks the failure on a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_lstm_serve_device_cuda_without_cuda_fails_in_one_line(device: str) -> None:
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    result = subprocess.run(
        [sys.executable, "-m", "service", "--port", "0", "--metrics-port", "0", "--device", device],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "LSTM_LOG_FORMAT": "text"},
    )
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.splitlines() == [
        f"lstm-serve: --device {device}: this onnxruntime build has no CUDA execution provider "
        f"(available: {', '.join(ort.get_available_providers())}); install onnxruntime-gpu on a "
        "machine with an NVIDIA GPU, or use --device cpu / auto"
    ]


@pytest.mark.skipif(DEVICE == "cuda", reason="checks the failure on a machine without CUDA")
def test_probe_names_the_missing_driver() -> None:
    if ctypes.util.find_library("cuda"):
        pytest.skip("this machine has an NVIDIA driver")
    with pytest.raises(DeviceUnavailableError, match=r"^--device cuda:2: no NVIDIA driver"):
        probe_cuda("cuda:2", 2)


async def test_the_provider_in_use_is_in_model_info_and_metrics(
    start_server: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Under ``make test-gpu`` (LSTM_TEST_DEVICE=cuda) this shows CUDA on device 0."""
    provider, device = (
        ("CUDAExecutionProvider", "cuda:0") if DEVICE.startswith("cuda") else (CPU, "cpu")
    )
    with caplog.at_level(logging.INFO):
        server = await start_server()
    assert f"provider={provider} device={device}" in caplog.text
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        info = await pb_grpc.LstmStreamStub(channel).GetModelInfo(pb.ModelInfoRequest())
    assert info.execution_provider == provider
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    (line,) = [x for x in text.splitlines() if x.startswith("lstm_model_info{")]
    assert f'provider="{provider}"' in line and f'device="{device}"' in line


FAKE_DRIVER = """
int cuInit(unsigned int flags) { return INIT; }
int cuDeviceGetCount(int *count) { *count = COUNT; return 0; }
"""


@pytest.mark.parametrize(
    ("init", "count", "device", "said"),
    [
        (100, 0, "cuda", "--device cuda: the NVIDIA driver found no usable GPU (cuInit error 100)"),
        (0, 1, "cuda:3", "--device cuda:3: this machine has 1 CUDA device(s) (cuda:0..cuda:0; "),
        (0, 0, "cuda", "--device cuda: this machine has 0 CUDA device(s) (none visible; "),
        (0, 2, "cuda:1", ""),
    ],
)
def test_probe_asks_the_driver(
    init: int, count: int, device: str, said: str, tmp_path: Path
) -> None:
    """A stand-in driver library (the two calls) answers as a real driver would."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None or not sys.platform.startswith("linux"):
        pytest.skip("needs a C compiler on Linux")
    source = tmp_path / "fake.c"
    source.write_text(FAKE_DRIVER.replace("INIT", str(init)).replace("COUNT", str(count)))
    library = tmp_path / "libcuda.so.1"
    built = subprocess.run(
        [compiler, "-shared", "-fPIC", "-o", str(library), str(source)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert built.returncode == 0, built.stderr
    if not said:
        probe_cuda(device, parse_device(device)[1], str(library))  # usable: no error
        return
    with pytest.raises(DeviceUnavailableError) as info:
        probe_cuda(device, parse_device(device)[1], str(library))
    assert str(info.value).startswith(said)
