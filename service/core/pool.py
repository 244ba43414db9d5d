"""The pending pool: accepted events not yet applied, oldest first, as parallel arrays."""

from __future__ import annotations

import numpy as np

from service.core.scan import first_per_row, join_rows, split_rows

Events = dict[str, np.ndarray]
"""Rows taken from a pool: one array per field of ``Pool.FIELDS``."""


class Pool:
    """Accepted events not yet applied, oldest first, as parallel arrays.

    Each event knows where its answer goes: ``intake`` (a key of ``Intakes``),
    ``row`` in that intake's arrays and ``job`` (the request) inside it. The
    columns are one dict, replaced whole, never changed in place: taking every
    event, or adding to an empty pool, moves the dict and copies nothing.
    """

    FIELDS = ("slots", "values", "seqs", "resets", "t0", "intake", "row", "job")

    def __init__(self, event_size: int):
        self._empty: Events = {
            "slots": np.zeros(0, np.int64),
            "values": np.zeros((0, event_size), np.float32),
            "seqs": np.zeros(0, np.uint64),
            "resets": np.zeros(0, np.bool_),
            "t0": np.zeros(0, np.float64),
            "intake": np.zeros(0, np.int64),
            "row": np.zeros(0, np.int64),
            "job": np.zeros(0, np.int64),
        }
        self._columns = self._empty
        self.size = 0
        """How many events are pending (``len``, without a call)."""
        self._marks = np.zeros(0, np.int64)
        """Scratch for ``pick``: a cell per table row, -1 between picks."""

    def __len__(self) -> int:
        return self.size

    @property
    def slots(self) -> np.ndarray:
        return self._columns["slots"]

    @property
    def t0(self) -> np.ndarray:
        """When each event's request arrived."""
        return self._columns["t0"]

    def extend(self, **new: np.ndarray) -> None:
        """Add events (every field of ``FIELDS``) after the others."""
        old = self._columns
        if not self.size:
            self._columns = new
        else:
            self._columns = join_rows(old, new, self.FIELDS)
        self.size = self._columns["slots"].size

    def push_front(self, rows: Events) -> None:
        """Put rows taken earlier back before every other row (they stay the oldest)."""
        old = self._columns
        self._columns = join_rows(rows, old, self.FIELDS)
        self.size = self._columns["slots"].size

    def take(self, picked: np.ndarray) -> Events:
        """Remove and return the rows at ``picked`` (sorted positions)."""
        columns = self._columns
        n = self.size
        if picked.size == n:
            self._columns = self._empty
            self.size = 0
            return columns
        taken, self._columns = split_rows(columns, picked, n)
        self.size = n - picked.size
        return taken

    def take_all(self) -> Events:
        return self.take(np.arange(len(self)))

    def pick(self, max_batch: int, rows: int) -> np.ndarray:
        """Positions of the earliest event of each session, oldest first, at most ``max_batch``.

        ``rows``: the table's capacity (slots are below it).
        """
        if self._marks.size < rows:
            self._marks = np.full(rows, -1, np.int64)
        return first_per_row(self.slots, max_batch, self._marks)


def select(events: Events, where: np.ndarray) -> Events:
    """The rows of ``events`` at ``where`` (positions or a mask)."""
    return {name: column[where] for name, column in events.items()}
