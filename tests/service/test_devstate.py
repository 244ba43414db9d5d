"""State pools on the device (IOBinding, in place) against the host table's gather/run/scatter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from model_export.default import default_model
from service.devstate import DeviceState, wrap_step
from service.runtime import ModelContractError, Runtime
from tests.conftest import DEVICE
from tests.model_export.frameworks import FIXTURES, export, spec

EXACT = not DEVICE.startswith("cuda")
"""On the CPU both paths run the same kernels on the same rows: equal bit for bit."""


def fixture_model(name: str, tmp_path: Path) -> bytes:
    """A framework fixture exported by lstm-export (its own arguments), as bytes."""
    args = spec(FIXTURES / f"{name}.json")["export_args"]
    out = tmp_path / f"{name}.onnx"
    result = export([*args, "--out", str(out)])
    assert result.code == 0, result.stderr
    return out.read_bytes()


def models(tmp_path: Path) -> dict[str, bytes]:
    return {
        "seed": default_model().SerializeToString(),
        "lstm_3layer_proj_linear": fixture_model("lstm_3layer_proj_linear", tmp_path),
        "gru_2layer_linear_softmax": fixture_model("gru_2layer_linear_softmax", tmp_path),
        # written by PyTorch's own exporter: its node names are not ours
        "torch_step": (FIXTURES / "torch_step_2layer_linear_sigmoid.onnx").read_bytes(),
    }


class HostPath:
    """What the server does today: numpy rows per state, gather by slot, run, scatter back."""

    def __init__(self, runtime: Runtime, capacity: int):
        self.runtime = runtime
        self.rows = [np.zeros((capacity, n), np.float32) for n in runtime.spec.state_sizes]

    def run(self, event: np.ndarray, slots: np.ndarray) -> np.ndarray:
        output, new = self.runtime.run(event, [r[slots] for r in self.rows])
        for rows, value in zip(self.rows, new):
            rows[slots] = value
        return output


def same(a: np.ndarray, b: np.ndarray) -> None:
    if EXACT:
        np.testing.assert_array_equal(a, b)
    else:
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def check_pools(device: DeviceState, host: HostPath) -> None:
    """Every row of every pool, those the runs did not touch included."""
    everything = np.arange(device.capacity)
    for got, want in zip(device.read(everything), host.rows):
        same(got, want)


@pytest.fixture(scope="module")
def all_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    return models(tmp_path_factory.mktemp("devstate"))


@pytest.mark.parametrize(
    "name", ["seed", "lstm_3layer_proj_linear", "gru_2layer_linear_softmax", "torch_step"]
)
def test_runs_equal_the_host_path(name: str, all_models: dict[str, bytes]) -> None:
    data = all_models[name]
    runtime = Runtime(data, name, DEVICE)
    capacity = 40
    device = DeviceState(data, runtime.spec, capacity, DEVICE)
    host = HostPath(runtime, capacity)
    rng = np.random.default_rng(7)
    # Rows start other than zero, so a pool that a run rewrote whole would show.
    start = np.arange(capacity)
    rows = [rng.standard_normal((capacity, n)).astype(np.float32) for n in runtime.spec.state_sizes]
    device.write(start, rows)
    for have, value in zip(host.rows, rows):
        have[:] = value
    for k in range(12):
        batch = int(rng.integers(1, 17))
        slots = rng.choice(capacity // 2, batch, replace=False)  # rows 20.. never run
        event = rng.standard_normal((batch, runtime.spec.event_size)).astype(np.float32)
        same(device.run(event, slots), host.run(event, slots))
        if k % 4 == 3:
            check_pools(device, host)
    check_pools(device, host)
    untouched = np.arange(capacity // 2, capacity)
    for got, value in zip(device.read(untouched), rows):
        np.testing.assert_array_equal(got, value[capacity // 2 :])


def test_writes_zeroes_and_growth_stay_coherent(all_models: dict[str, bytes]) -> None:
    data = all_models["lstm_3layer_proj_linear"]
    runtime = Runtime(data, "proj", DEVICE)
    sizes = runtime.spec.state_sizes
    device = DeviceState(data, runtime.spec, 8, DEVICE)
    host = HostPath(runtime, 8)
    rng = np.random.default_rng(3)

    def step(slots: list[int]) -> None:
        index = np.array(slots)
        event = rng.standard_normal((len(slots), runtime.spec.event_size)).astype(np.float32)
        same(device.run(event, index), host.run(event, index))

    step([0, 1, 2, 3])
    # PutSession / a restore from the store / a move: the given rows, exactly.
    put = [rng.standard_normal((2, n)).astype(np.float32) for n in sizes]
    device.write(np.array([1, 6]), put)
    for rows, value in zip(host.rows, put):
        rows[[1, 6]] = value
    for got, value in zip(device.read(np.array([6, 1])), put):
        np.testing.assert_array_equal(got, value[::-1])
    step([1, 6, 2])
    # ResetSession / a new session in a reused slot: zero rows, others untouched.
    device.zero(np.array([2, 3]))
    for rows in host.rows:
        rows[[2, 3]] = 0
    assert not any(r.any() for r in device.read(np.array([2, 3])))
    check_pools(device, host)
    step([2, 0, 3])
    # The table grew: old rows kept, new ones zero, and runs reach them.
    device.grow(20)
    assert device.capacity == 20
    host.rows = [np.concatenate([r, np.zeros((12, r.shape[1]), np.float32)]) for r in host.rows]
    check_pools(device, host)
    step([19, 0, 8, 6])
    device.write(np.array([15]), [np.ones((1, n), np.float32) for n in sizes])
    for rows in host.rows:
        rows[15] = 1
    step([15, 19])
    check_pools(device, host)
    device.grow(10)  # shrinking is not a thing: a no-op
    assert device.capacity == 20


def test_the_pool_is_updated_in_place(all_models: dict[str, bytes]) -> None:
    """The pool bound as input and output is the buffer written: no new pool per run."""
    data = all_models["seed"]
    runtime = Runtime(data, "seed", DEVICE)
    device = DeviceState(data, runtime.spec, 16, DEVICE)
    before = [pool.data_ptr() for pool in device._pools]
    device.run(np.ones((2, 32), np.float32), np.array([3, 5]))
    assert [pool.data_ptr() for pool in device._pools] == before
    hidden = device.read(np.arange(16))[0]
    assert hidden[[3, 5]].any() and not np.delete(hidden, [3, 5], axis=0).any()


def test_bad_calls_are_refused(all_models: dict[str, bytes]) -> None:
    data = all_models["seed"]
    runtime = Runtime(data, "seed", DEVICE)
    device = DeviceState(data, runtime.spec, 4, DEVICE)
    with pytest.raises(IndexError, match=r"slot out of range 0\.\.3"):
        device.run(np.ones((1, 32), np.float32), np.array([4]))
    with pytest.raises(ValueError, match=r"rows of cell: shape \(1, 3\), want \(1, 64\)"):
        device.write(np.array([0]), [np.ones((1, 64)), np.ones((1, 3))])
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        DeviceState(data, runtime.spec, 0, DEVICE)
    old = onnx.load_model_from_string(data)
    old.opset_import[0].version = 10
    with pytest.raises(ModelContractError, match="needs opset >= 11"):
        wrap_step(old.SerializeToString(), runtime.spec)
