"""The typed face of admission's and the pool's compiled loops (`scan.pyx`)."""

from typing import Any

import numpy as np

class Scanned:
    session_ids: list[str]
    values: np.ndarray
    """``[n, E]`` float32: the requests' values, one row per event."""
    seqs: np.ndarray
    resets: np.ndarray
    job_of: np.ndarray
    """Each event's request (its position in the jobs scanned)."""
    t0: np.ndarray
    """When each event's request arrived (``perf_counter``)."""
    slots: np.ndarray
    """Each event's row in the index scanned; -1 where its session is not there."""
    not_finite: list[int] | None
    """Events whose values hold NaN or Inf (None: none)."""
    unknown: int
    """How many events' sessions are not in the index."""
    bad: bool
    """Some request brought events refused while decoding (``EventBlock.bad``)."""
    asked: bool
    """Some request names a model version."""

def scan(jobs: list[Any], index: dict[str, int] | None, event_size: int) -> Scanned: ...
def first_per_row(slots: np.ndarray, max_batch: int, marks: np.ndarray) -> np.ndarray: ...
def split_rows(
    columns: dict[str, np.ndarray], picked: np.ndarray, n: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]: ...
def join_rows(
    first: dict[str, np.ndarray], second: dict[str, np.ndarray], names: tuple[str, ...]
) -> dict[str, np.ndarray]: ...
def result_columns(
    n: int, output_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]: ...
def job_counts(jobs: np.ndarray) -> list[tuple[int, int]]: ...
def stretches(keys: np.ndarray) -> list[tuple[int, int, int]]: ...
