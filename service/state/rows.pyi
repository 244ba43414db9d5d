"""The typed face of a table's compiled gathers and scatters (`rows.pyx`)."""

import numpy as np

def take_rows(table: np.ndarray, slots: np.ndarray) -> np.ndarray: ...
def put_rows(table: np.ndarray, slots: np.ndarray, rows: np.ndarray) -> None: ...
def advanced(
    step: np.ndarray, last_seq: np.ndarray, slots: np.ndarray, seqs: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]: ...
def put_counters(
    step: np.ndarray,
    last_seq: np.ndarray,
    updated: np.ndarray,
    slots: np.ndarray,
    new_step: np.ndarray,
    new_last: np.ndarray,
    now: float,
) -> None: ...
