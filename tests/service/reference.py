"""The numpy reference applied per session, to check what the server answers."""

from __future__ import annotations

import numpy as np

from model_export import lstm
from model_export.default import default_parameters


class Reference:
    """Per-session float64 state advanced with ``lstm.step``, as the seed's LSTM defines it."""

    def __init__(self, parameters: lstm.Parameters | None = None):
        self.p = parameters or default_parameters()
        self.hidden: dict[str, np.ndarray] = {}
        self.cell: dict[str, np.ndarray] = {}

    def step(self, session_id: str, values: np.ndarray, reset: bool = False) -> np.ndarray:
        zeros = np.zeros(self.p.hidden_size)
        h = zeros if reset else self.hidden.get(session_id, zeros)
        c = zeros if reset else self.cell.get(session_id, zeros)
        h, c = lstm.step(np.asarray(values, np.float64), h, c, self.p)
        self.hidden[session_id], self.cell[session_id] = h, c
        return h


def events(rng: np.random.Generator, n: int, e: int = 32) -> np.ndarray:
    return rng.standard_normal((n, e)).astype(np.float32)
