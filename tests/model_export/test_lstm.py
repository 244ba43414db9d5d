"""The numpy reference against the seed notebook's numbers."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest

from model_export import lstm

# The seed notebook's code cells, verbatim but for the import (``import lstm``).
NOTEBOOK_CELLS = [
    "from model_export import lstm",
    "EVENT_SIZE, HIDDEN_SIZE = 3, 3\n"
    "parameters = lstm.Parameters(event_size=EVENT_SIZE, hidden_size=HIDDEN_SIZE)",
    "import numpy as np\n\n"
    "event = np.array([10, 0, 0])\n"
    "hidden_state = np.array([0, 0, 10])\n"
    "prev_cell_state = np.array([1, 1, 1])\n"
    "print(lstm.forget_gate(event=event, hidden_state=hidden_state, parameters=parameters, "
    "prev_cell_state=prev_cell_state))",
    "parameters.event_forget_weights = np.eye(HIDDEN_SIZE, EVENT_SIZE)\n"
    "parameters.hidden_forget_weights = np.eye(HIDDEN_SIZE, EVENT_SIZE)\n"
    "print(lstm.forget_gate(event=event, hidden_state=hidden_state, parameters=parameters, "
    "prev_cell_state=prev_cell_state))",
    "parameters.event_forget_weights = np.eye(HIDDEN_SIZE, EVENT_SIZE)\n"
    "parameters.hidden_forget_weights = np.zeros((HIDDEN_SIZE, EVENT_SIZE))\n"
    "print(lstm.forget_gate(event=event, hidden_state=hidden_state, parameters=parameters, "
    "prev_cell_state=prev_cell_state))",
]
NOTEBOOK_OUTPUTS = [
    "[0.5 0.5 0.5]",
    "[0.9999546 0.5       0.9999546]",
    "[0.9999546 0.5       0.5      ]",
]

X = np.array([10.0, 0.0, 0.0])
H = np.array([0.0, 0.0, 10.0])
C = np.array([1.0, 1.0, 1.0])


def test_notebook_cells_print_the_notebooks_numbers() -> None:
    namespace: dict[str, object] = {}
    printed = []
    for cell in NOTEBOOK_CELLS:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(cell, namespace)
        if out.getvalue():
            printed.append(out.getvalue().strip())
    assert printed == NOTEBOOK_OUTPUTS


@pytest.mark.parametrize(
    ("event_w", "hidden_w", "expected"),
    [
        (np.zeros((3, 3)), np.zeros((3, 3)), [0.5, 0.5, 0.5]),
        (np.eye(3), np.eye(3), [0.9999546, 0.5, 0.9999546]),
        (np.eye(3), np.zeros((3, 3)), [0.9999546, 0.5, 0.5]),
    ],
)
def test_seed_forget_gate_vectors(
    event_w: np.ndarray, hidden_w: np.ndarray, expected: list[float]
) -> None:
    p = lstm.Parameters(3, 3)
    p.event_forget_weights = event_w
    p.hidden_forget_weights = hidden_w
    np.testing.assert_allclose(lstm.forget_gate(X, H, C, p), expected, rtol=0, atol=5e-8)


def test_parameters_start_as_zeros_with_scalar_biases() -> None:
    p = lstm.Parameters(event_size=2, hidden_size=5)
    for name in lstm.PARAMETER_NAMES:
        value = np.asarray(getattr(p, name))
        assert not value.any(), name
        if name.endswith("_bias"):
            assert value.shape == ()
    assert np.asarray(p.event_input_weights).shape == (5, 2)
    assert np.asarray(p.hidden_output_weights).shape == (5, 5)


def test_step_composes_the_gates() -> None:
    p = lstm.Parameters.random(4, 6, seed=1)
    rng = np.random.default_rng(2)
    x, h, c = rng.standard_normal(4), rng.standard_normal(6), rng.standard_normal(6)
    new_h, new_c = lstm.step(x, h, c, p)
    expected_c = lstm.forget_gate(x, h, c, p) + lstm.input_gate(x, h, p)
    np.testing.assert_allclose(new_c, expected_c)
    np.testing.assert_allclose(new_h, lstm.output_gate(x, h, expected_c, p))
    # Spelled out from the LSTM equations, independently of the gate helpers.
    a = p.arrays()

    def z(g: str) -> np.ndarray:
        return (
            a[f"hidden_{g}_weights"] @ h
            + a[f"hidden_{g}_bias"]
            + a[f"event_{g}_weights"] @ x
            + a[f"event_{g}_bias"]
        )

    def sig(v: np.ndarray) -> np.ndarray:
        return 1 / (1 + np.exp(-v))

    c_ref = sig(z("forget")) * c + sig(z("input")) * np.tanh(z("candidate"))
    np.testing.assert_allclose(new_c, c_ref, atol=1e-12)
    np.testing.assert_allclose(new_h, sig(z("output")) * np.tanh(c_ref), atol=1e-12)


def test_batch_rows_equal_single_steps() -> None:
    p = lstm.Parameters.random(3, 5, seed=3, vector_biases=False)
    rng = np.random.default_rng(4)
    xs, hs, cs = (
        rng.standard_normal((7, 3)),
        rng.standard_normal((7, 5)),
        rng.standard_normal((7, 5)),
    )
    batch_h, batch_c = lstm.step(xs, hs, cs, p)
    for row in range(7):
        one_h, one_c = lstm.step(xs[row], hs[row], cs[row], p)
        np.testing.assert_allclose(batch_h[row], one_h, atol=1e-12)
        np.testing.assert_allclose(batch_c[row], one_c, atol=1e-12)


def test_sigmoid_is_stable_for_large_inputs() -> None:
    with np.errstate(all="raise"):
        np.testing.assert_allclose(lstm.sigmoid(np.array([-1e4, 0.0, 1e4])), [0.0, 0.5, 1.0])
