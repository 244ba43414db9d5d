"""The generalised reference and step graph: random architectures, layout, metadata, dtypes."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import h5py
import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

from model_export import __version__, lstm
from model_export.arch import (
    Architecture,
    ModelImportError,
    from_seed,
    random_architecture,
)
from model_export.graph import build_step_model, max_step_difference
from model_export.keras_import import load_keras
from model_export.reference import step
from model_export.torch_import import _load_safetensors_bf16, import_state_dict, load_state_dict

from .frameworks import FIXTURES, keras_variant

HEAD_ACTIVATIONS = ("relu", "tanh", "sigmoid", "identity", "elu", "gelu", "silu", "softmax")


@st.composite
def architectures(draw: st.DrawFn) -> Architecture:
    cell = draw(st.sampled_from(["lstm", "gru"]))
    hidden = draw(st.integers(1, 8))
    proj = draw(st.integers(0, hidden - 1)) if cell == "lstm" and hidden > 1 else 0
    head: list[int | str] = []
    for _ in range(draw(st.integers(0, 3))):
        if head and draw(st.booleans()):
            head.append(draw(st.sampled_from(HEAD_ACTIVATIONS)))
        head.append(draw(st.integers(1, 6)))
    if head and draw(st.booleans()):
        head.append(draw(st.sampled_from(HEAD_ACTIVATIONS)))
    return random_architecture(
        cell,
        draw(st.integers(1, 6)),
        hidden,
        layers=draw(st.integers(1, 3)),
        proj_size=proj,
        bias=draw(st.booleans()),
        linear_before_reset=draw(st.booleans()),
        head=head,
        output_activation=draw(st.sampled_from(["none", "sigmoid", "tanh", "softmax"])),
        seed=draw(st.integers(0, 2**32 - 1)),
        scale=draw(st.sampled_from([1.0, 3.0])),
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arch=architectures(), batch=st.integers(1, 9), seed=st.integers(0, 1000))
def test_step_graph_equals_reference_over_consecutive_steps(
    arch: Architecture, batch: int, seed: int
) -> None:
    session = ort.InferenceSession(
        build_step_model(arch).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    rng = np.random.default_rng(seed)
    states = {
        name: rng.standard_normal((batch, size)).astype(np.float32)
        for name, size in arch.state_sizes.items()
    }
    ref: dict[str, np.ndarray] = {k: v.astype(np.float64) for k, v in states.items()}
    names = list(states)
    for _ in range(4):
        x = rng.standard_normal((batch, arch.event_size)).astype(np.float32)
        got = session.run(["output", *(f"{n}_out" for n in names)], {"event": x, **states})
        want, ref = step(arch, x, ref)
        assert got[0].shape == (batch, arch.output_size)
        np.testing.assert_allclose(got[0], want, rtol=0, atol=1e-5)
        for name, value in zip(names, got[1:]):
            np.testing.assert_allclose(value, ref[name], rtol=0, atol=1e-5)
        states = dict(zip(names, got[1:]))


def test_seed_form_is_the_same_lstm() -> None:
    p = lstm.Parameters.random(5, 7, seed=3, vector_biases=False)
    arch = from_seed(p)
    rng = np.random.default_rng(0)
    x, h, c = (
        rng.standard_normal((3, 4, 5)),
        rng.standard_normal((4, 7)),
        rng.standard_normal((4, 7)),
    )
    want_h, want_c = lstm.step(x[0], h, c, p)
    out, states = step(arch, x[0], {"hidden": h, "cell": c})
    # from_seed rounds the weights to float32, as every exported model does.
    np.testing.assert_allclose(states["hidden"], want_h, atol=1e-6)
    np.testing.assert_allclose(states["cell"], want_c, atol=1e-6)
    np.testing.assert_array_equal(out, states["hidden"])


def test_state_layout_and_metadata() -> None:
    arch = random_architecture(
        "lstm", 6, 24, layers=3, proj_size=8, head=(8, "relu", 1), output_activation="sigmoid"
    )
    assert arch.state_sizes == {"hidden": 24, "cell": 72}
    model = build_step_model(arch)
    assert [i.name for i in model.graph.input] == ["event", "hidden", "cell"]
    assert [o.name for o in model.graph.output] == ["output", "hidden_out", "cell_out"]
    for value in [*model.graph.input, *model.graph.output]:
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch"
    meta = {m.key: m.value for m in model.metadata_props}
    assert meta == {
        "event_size": "6",
        "hidden_size": "24",
        "output_size": "1",
        "exporter_version": __version__,
        "fingerprint": arch.fingerprint(),
        "cell": "lstm",
        "layers": "3",
        "proj_size": "8",
        "head": "linear(8->8),relu,linear(8->1)",
        "output_activation": "sigmoid",
        "source_framework": "random",
        "source_file": "",
        "op": "graph",
    }
    assert [o.version for o in model.opset_import] == [17] and model.ir_version == 8


def test_gru_has_hidden_only() -> None:
    model = build_step_model(random_architecture("gru", 3, 4, layers=2))
    assert [i.name for i in model.graph.input] == ["event", "hidden"]
    assert [o.name for o in model.graph.output] == ["output", "hidden_out"]


def test_stacked_state_is_layer_major() -> None:
    arch = random_architecture("gru", 3, 4, layers=2, seed=1)
    h = np.zeros((1, 8))
    _, zero_top = step(arch, np.ones((1, 3)), {"hidden": h})
    h[0, 4:] = 5.0  # layer 1's slice: layer 0's new state must not change
    _, changed_top = step(arch, np.ones((1, 3)), {"hidden": h})
    np.testing.assert_array_equal(changed_top["hidden"][:, :4], zero_top["hidden"][:, :4])
    assert not np.allclose(changed_top["hidden"][:, 4:], zero_top["hidden"][:, 4:])


def test_check_catches_a_wrong_model() -> None:
    a = random_architecture("lstm", 3, 5, layers=2, head=(2,), seed=0)
    b = random_architecture("lstm", 3, 5, layers=2, head=(2,), seed=1)
    assert max_step_difference(build_step_model(a), a) < 1e-5
    assert max_step_difference(build_step_model(b), a) > 1e-2
    swapped = random_architecture("gru", 3, 5, linear_before_reset=False, seed=2)
    pytorch_form = random_architecture("gru", 3, 5, linear_before_reset=True, seed=2)
    assert max_step_difference(build_step_model(swapped), pytorch_form) > 1e-3


def test_fingerprint_depends_on_structure_not_just_weights() -> None:
    base = random_architecture("gru", 3, 5, head=(2,), seed=4)
    other = random_architecture("gru", 3, 5, head=(2,), seed=4, output_activation="sigmoid")
    variant = random_architecture("gru", 3, 5, head=(2,), seed=4, linear_before_reset=False)
    assert len({base.fingerprint(), other.fingerprint(), variant.fingerprint()}) == 3
    assert base.fingerprint() == random_architecture("gru", 3, 5, head=(2,), seed=4).fingerprint()


def test_layers_of_different_sizes_are_refused() -> None:
    a = random_architecture("lstm", 3, 5)
    b = random_architecture("lstm", 5, 4)
    with pytest.raises(ModelImportError, match="same sizes in every layer"):
        Architecture("lstm", (a.layers[0], b.layers[0]))


# -- dtypes -----------------------------------------------------------------------------------


def _write_bf16(path: Path, state: dict[str, np.ndarray]) -> None:
    """A safetensors file with BF16 tensors, written by hand (numpy has no bfloat16)."""
    header, chunks, offset = {}, [], 0
    for key, value in state.items():
        bits = (np.ascontiguousarray(value, np.float32).view(np.uint32) >> 16).astype("<u2")
        data = bits.tobytes()
        header[key] = {
            "dtype": "BF16",
            "shape": list(value.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(chunks))


@pytest.mark.parametrize("dtype", ["float16", "float64", "bfloat16"])
def test_half_and_double_weights_become_float32(dtype: str, tmp_path: Path) -> None:
    source = load_file(str(FIXTURES / "lstm_2layer_linear_sigmoid.safetensors"))
    path = tmp_path / f"m_{dtype}.safetensors"
    if dtype == "bfloat16":
        _write_bf16(path, source)
        rounded = {k: ((v.view(np.uint32) >> 16) << 16).view(np.float32) for k, v in source.items()}
    else:
        save_file({k: v.astype(dtype) for k, v in source.items()}, str(path))
        rounded = {k: v.astype(dtype).astype(np.float32) for k, v in source.items()}
    state = load_state_dict(path)
    readings = [state]
    if dtype == "bfloat16":
        # Without ml_dtypes registered, safetensors.numpy cannot read BF16: the fallback.
        readings.append(_load_safetensors_bf16(str(path)))
    for reading in readings:
        assert {v.dtype for v in reading.values()} == {np.dtype(np.float32)}
        for key, value in rounded.items():
            np.testing.assert_array_equal(reading[key], value)
    arch = import_state_dict(state, rnn="encoder", head="fc", output_activation="sigmoid")
    assert max_step_difference(build_step_model(arch), arch) < 1e-5


@pytest.mark.parametrize("dtype", ["float16", "float64"])
def test_keras_half_and_double_weights_become_float32(dtype: str, tmp_path: Path) -> None:
    source = "keras_gru_1layer_dense_none.keras"
    original = load_keras(FIXTURES / source)

    def convert(h5: h5py.File) -> None:
        paths: list[str] = []
        h5.visititems(lambda name, obj: paths.append(name) if hasattr(obj, "shape") else None)
        for path in paths:
            value = h5[path][()]
            del h5[path]
            h5[path] = value.astype(dtype)

    arch = load_keras(tmp_path / keras_variant(tmp_path, source, change_weights=convert))
    assert arch.layers[0].weight_ih.dtype == np.float32
    want = original.layers[0].weight_ih.astype(dtype).astype(np.float32)
    np.testing.assert_array_equal(arch.layers[0].weight_ih, want)
    assert (arch.fingerprint() == original.fingerprint()) == (dtype == "float64")
    assert max_step_difference(build_step_model(arch), arch) < 1e-5
