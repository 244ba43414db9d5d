"""The numpy reference LSTM: the seed notebook's ``lstm`` module, batched."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

GATES = ("forget", "input", "candidate", "output")
"""Gate names in the seed's attribute order."""

PARAMETER_NAMES = tuple(
    f"{side}_{gate}_{kind}"
    for gate in GATES
    for side in ("event", "hidden")
    for kind in ("weights", "bias")
)
"""The 16 seed-named attributes, which are also the keys of a parameter file."""

Array = NDArray[np.floating]


def sigmoid(x: ArrayLike) -> Array:
    """Logistic function; written with tanh so large |x| never overflows."""
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x)))


class Parameters:
    """The whole parametrisation of one LSTM cell, zeros at first (as in the seed).

    For gate ``g`` there are event weights ``[H, E]``, an event bias, hidden
    weights ``[H, H]`` and a hidden bias. A bias may be a scalar or ``[H]``.
    """

    def __init__(self, event_size: int, hidden_size: int):
        if event_size < 1 or hidden_size < 1:
            raise ValueError(
                f"event_size and hidden_size must be >= 1, got {event_size}, {hidden_size}"
            )
        self.event_size = event_size
        self.hidden_size = hidden_size
        self.event_forget_weights: ArrayLike = np.zeros((hidden_size, event_size))
        self.event_forget_bias: ArrayLike = 0
        self.hidden_forget_weights: ArrayLike = np.zeros((hidden_size, hidden_size))
        self.hidden_forget_bias: ArrayLike = 0
        self.event_input_weights: ArrayLike = np.zeros((hidden_size, event_size))
        self.event_input_bias: ArrayLike = 0
        self.hidden_input_weights: ArrayLike = np.zeros((hidden_size, hidden_size))
        self.hidden_input_bias: ArrayLike = 0
        self.event_candidate_weights: ArrayLike = np.zeros((hidden_size, event_size))
        self.event_candidate_bias: ArrayLike = 0
        self.hidden_candidate_weights: ArrayLike = np.zeros((hidden_size, hidden_size))
        self.hidden_candidate_bias: ArrayLike = 0
        self.event_output_weights: ArrayLike = np.zeros((hidden_size, event_size))
        self.event_output_bias: ArrayLike = 0
        self.hidden_output_weights: ArrayLike = np.zeros((hidden_size, hidden_size))
        self.hidden_output_bias: ArrayLike = 0

    @classmethod
    def random(
        cls, event_size: int, hidden_size: int, seed: int, vector_biases: bool = True
    ) -> Parameters:
        """Uniform(-1/sqrt(H), 1/sqrt(H)) parameters, as common LSTM initialisers use."""
        rng = np.random.default_rng(seed)
        params = cls(event_size, hidden_size)
        bound = 1.0 / np.sqrt(hidden_size)
        for name, shape in params.expected_shapes().items():
            if name.endswith("_bias") and not vector_biases:
                value: ArrayLike = float(rng.uniform(-bound, bound))
            else:
                value = rng.uniform(-bound, bound, size=shape)
            setattr(params, name, value)
        return params

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """The full shape of every attribute (a bias may also be a scalar)."""
        h, e = self.hidden_size, self.event_size
        shapes: dict[str, tuple[int, ...]] = {}
        for gate in GATES:
            shapes[f"event_{gate}_weights"] = (h, e)
            shapes[f"event_{gate}_bias"] = (h,)
            shapes[f"hidden_{gate}_weights"] = (h, h)
            shapes[f"hidden_{gate}_bias"] = (h,)
        return shapes

    def arrays(self) -> dict[str, NDArray[np.float64]]:
        """Every attribute as a float64 array, biases broadcast to ``[H]``."""
        out = {}
        for name, shape in self.expected_shapes().items():
            out[name] = np.broadcast_to(
                np.asarray(getattr(self, name), dtype=np.float64), shape
            ).copy()
        return out


def _gate_input(
    gate: str, event: ArrayLike, hidden_state: ArrayLike, parameters: Parameters
) -> Array:
    """``z_g = W_hg h + b_hg + W_eg x + b_eg``; rows of a batch are independent."""
    p = parameters
    hidden = np.asarray(hidden_state) @ np.asarray(
        getattr(p, f"hidden_{gate}_weights")
    ).T + np.asarray(getattr(p, f"hidden_{gate}_bias"))
    evented = np.asarray(event) @ np.asarray(getattr(p, f"event_{gate}_weights")).T + np.asarray(
        getattr(p, f"event_{gate}_bias")
    )
    return hidden + evented


def forget_gate(
    event: ArrayLike, hidden_state: ArrayLike, prev_cell_state: ArrayLike, parameters: Parameters
) -> Array:
    """Forget gate deciding how much of the previous cell state to keep: ``f * c``."""
    return sigmoid(_gate_input("forget", event, hidden_state, parameters)) * np.asarray(
        prev_cell_state
    )


def input_gate(event: ArrayLike, hidden_state: ArrayLike, parameters: Parameters) -> Array:
    """Input gate times candidate: ``i * g``, what is added to the kept cell state."""
    i = sigmoid(_gate_input("input", event, hidden_state, parameters))
    return i * candidate(event, hidden_state, parameters)


def candidate(event: ArrayLike, hidden_state: ArrayLike, parameters: Parameters) -> Array:
    """Candidate cell values ``g = tanh(z_candidate)``."""
    return np.tanh(_gate_input("candidate", event, hidden_state, parameters))


def output_gate(
    event: ArrayLike, hidden_state: ArrayLike, cell_state: ArrayLike, parameters: Parameters
) -> Array:
    """Output gate applied to the new cell state: ``h' = o * tanh(c')``."""
    o = sigmoid(_gate_input("output", event, hidden_state, parameters))
    return o * np.tanh(np.asarray(cell_state))


def step(
    event: ArrayLike, hidden_state: ArrayLike, cell_state: ArrayLike, parameters: Parameters
) -> tuple[Array, Array]:
    """One LSTM step: returns the new ``(hidden, cell)``; accepts ``[E]`` or ``[B, E]``."""
    cell = forget_gate(event, hidden_state, cell_state, parameters) + input_gate(
        event, hidden_state, parameters
    )
    hidden = output_gate(event, hidden_state, cell, parameters)
    return hidden, cell
