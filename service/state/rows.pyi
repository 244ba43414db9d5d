"""The typed face of the compiled row counters (`rows.pyx`)."""

import numpy as np

def add_at(counts: np.ndarray, rows: np.ndarray, delta: int) -> None: ...
