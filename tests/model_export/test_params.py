"""Parameter files: round trip, and a clear error for every bad file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from model_export.lstm import PARAMETER_NAMES, Parameters
from model_export.params import ParameterFileError, fingerprint, load_parameters, save_parameters


def arrays_of(p: Parameters) -> dict[str, np.ndarray]:
    return {name: np.asarray(getattr(p, name), dtype=np.float64) for name in PARAMETER_NAMES}


def write(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    np.savez(path, **arrays)
    return path


def test_round_trip_keeps_values_and_scalar_biases(tmp_path: Path) -> None:
    p = Parameters.random(3, 4, seed=0, vector_biases=False)
    p.event_input_bias = np.arange(4.0)
    save_parameters(tmp_path / "p.npz", p)
    with np.load(tmp_path / "p.npz") as archive:
        assert sorted(archive.files) == sorted(PARAMETER_NAMES)
    q = load_parameters(tmp_path / "p.npz")
    assert (q.event_size, q.hidden_size) == (3, 4)
    for name in PARAMETER_NAMES:
        np.testing.assert_array_equal(np.asarray(getattr(q, name)), np.asarray(getattr(p, name)))
    assert np.asarray(q.event_forget_bias).shape == ()
    assert fingerprint(q) == fingerprint(p)


def test_seed_defaults_round_trip(tmp_path: Path) -> None:
    save_parameters(tmp_path / "zeros.npz", Parameters(3, 3))
    q = load_parameters(tmp_path / "zeros.npz")
    assert not np.asarray(q.hidden_candidate_weights).any()


def test_missing_key(tmp_path: Path) -> None:
    arrays = arrays_of(Parameters(2, 3))
    del arrays["hidden_output_bias"]
    with pytest.raises(ParameterFileError, match=r"missing key.*hidden_output_bias"):
        load_parameters(write(tmp_path / "p.npz", arrays))


def test_unknown_key(tmp_path: Path) -> None:
    arrays = arrays_of(Parameters(2, 3))
    arrays["peephole_weights"] = np.zeros(3)
    with pytest.raises(ParameterFileError, match=r"unknown key.*peephole_weights"):
        load_parameters(write(tmp_path / "p.npz", arrays))


def test_wrong_weight_shape(tmp_path: Path) -> None:
    arrays = arrays_of(Parameters(2, 3))
    arrays["hidden_input_weights"] = np.zeros((3, 2))
    with pytest.raises(
        ParameterFileError, match=r"key hidden_input_weights has shape \[3, 2\]; expected \[3, 3\]"
    ):
        load_parameters(write(tmp_path / "p.npz", arrays))


def test_wrong_bias_shape(tmp_path: Path) -> None:
    arrays = arrays_of(Parameters(2, 3))
    arrays["event_candidate_bias"] = np.zeros(2)
    with pytest.raises(
        ParameterFileError,
        match=r"key event_candidate_bias has shape \[2\]; expected \[3\] or a scalar",
    ):
        load_parameters(write(tmp_path / "p.npz", arrays))


def test_reference_matrix_not_2d(tmp_path: Path) -> None:
    arrays = arrays_of(Parameters(2, 3))
    arrays["event_forget_weights"] = np.zeros(3)
    with pytest.raises(ParameterFileError, match=r"event_forget_weights.*hidden_size, event_size"):
        load_parameters(write(tmp_path / "p.npz", arrays))


@pytest.mark.parametrize("dtype", [np.int64, np.bool_, np.complex128])
def test_non_float(tmp_path: Path, dtype: type) -> None:
    arrays = arrays_of(Parameters(2, 3))
    arrays["event_output_weights"] = np.zeros((3, 2), dtype=dtype)
    with pytest.raises(
        ParameterFileError, match=r"key event_output_weights has dtype .*expected a float"
    ):
        load_parameters(write(tmp_path / "p.npz", arrays))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf(tmp_path: Path, bad: float) -> None:
    arrays = arrays_of(Parameters(2, 3))
    arrays["hidden_forget_weights"][1, 2] = bad
    with pytest.raises(ParameterFileError, match=r"key hidden_forget_weights contains NaN or Inf"):
        load_parameters(write(tmp_path / "p.npz", arrays))


def test_not_an_npz(tmp_path: Path) -> None:
    (tmp_path / "p.npz").write_text("hello")
    with pytest.raises(ParameterFileError, match=r"not a readable \.npz"):
        load_parameters(tmp_path / "p.npz")


def test_fingerprint_changes_with_any_value() -> None:
    p = Parameters.random(2, 3, seed=0)
    q = Parameters.random(2, 3, seed=0)
    assert fingerprint(p) == fingerprint(q)
    q.hidden_output_bias = np.asarray(q.hidden_output_bias) + 1e-3
    assert fingerprint(p) != fingerprint(q)
