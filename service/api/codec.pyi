"""The typed face of the compiled codec (`codec.pyx`): request bytes in, response bytes out."""

from collections.abc import Sequence

import numpy as np

class StepRequestWire:
    """A ``StepRequest`` read from its bytes."""

    data: bytes
    session_ids: list[str]
    seqs: np.ndarray | None
    """uint64 per event; None when every seq is 0 (per-event form) or none was sent (columnar)."""
    resets: np.ndarray | None
    """bool per event; None as for ``seqs``."""
    include_state: bool
    model: str
    model_version: int
    columnar: bool
    """The request carries ``batch``."""
    mixed: bool
    """It carries both ``batch`` and ``events`` (refused)."""
    n_seqs: int
    """Columnar: how many seqs the batch gave."""
    n_resets: int
    values_bytes: int
    """Columnar: the byte count of ``batch.values``."""
    @property
    def n(self) -> int: ...
    def values(self, size: int) -> tuple[np.ndarray, dict[int, str] | None]: ...

class MalformedBatch(ValueError):
    """A columnar batch whose lengths disagree (the message says how)."""

def read_step_request(data: bytes) -> StepRequestWire | None: ...
def varint(value: int) -> bytes: ...
def encode_batch(
    step_column: np.ndarray,
    output_rows: np.ndarray,
    code_column: np.ndarray,
    duplicate_flags: np.ndarray,
    errors: dict[int, str],
    version_column: np.ndarray,
) -> bytes: ...
def encode_results(
    session_ids: list[str],
    seq_column: np.ndarray | None,
    step_column: np.ndarray,
    output_rows: np.ndarray,
    duplicate_flags: np.ndarray,
    errors: dict[int, tuple[int, str]],
    states: Sequence[tuple[str, np.ndarray]],
    version_column: np.ndarray,
) -> bytes: ...
