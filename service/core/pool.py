"""The pending pool: accepted events not yet applied, oldest first, as parallel arrays."""

from __future__ import annotations

import numpy as np

Events = dict[str, np.ndarray]
"""Rows taken from a pool: one array per field of ``Pool.FIELDS``."""


class Pool:
    """Accepted events not yet applied, oldest first, as parallel arrays.

    Each event knows where its answer goes: ``intake`` (a key of ``Intakes``),
    ``row`` in that intake's arrays and ``job`` (the request) inside it.
    """

    FIELDS = ("slots", "values", "seqs", "resets", "t0", "intake", "row", "job")

    def __init__(self, event_size: int):
        self.slots = np.zeros(0, np.int64)
        self.values = np.zeros((0, event_size), np.float32)
        self.seqs = np.zeros(0, np.uint64)
        self.resets = np.zeros(0, np.bool_)
        self.t0 = np.zeros(0, np.float64)
        self.intake = np.zeros(0, np.int64)
        self.row = np.zeros(0, np.int64)
        self.job = np.zeros(0, np.int64)

    def __len__(self) -> int:
        return self.slots.size

    def extend(self, **new: np.ndarray) -> None:
        for name in self.FIELDS:
            old = getattr(self, name)
            setattr(self, name, np.concatenate((old, new[name])) if old.size else new[name])

    def push_front(self, rows: Events) -> None:
        """Put rows taken earlier back before every other row (they stay the oldest)."""
        for name in self.FIELDS:
            setattr(self, name, np.concatenate((rows[name], getattr(self, name))))

    def take(self, picked: np.ndarray) -> Events:
        """Remove and return the rows at ``picked`` (sorted positions)."""
        out = {}
        if picked.size == len(self):
            for name in self.FIELDS:
                out[name] = getattr(self, name)
                setattr(self, name, out[name][:0])
            return out
        keep = np.ones(len(self), np.bool_)
        keep[picked] = False
        for name in self.FIELDS:
            column = getattr(self, name)
            out[name] = column[picked]
            setattr(self, name, column[keep])
        return out

    def take_all(self) -> Events:
        return self.take(np.arange(len(self)))

    def pick(self, max_batch: int) -> np.ndarray:
        """Positions of the earliest event of each session, oldest first, at most ``max_batch``."""
        slots = self.slots
        n = slots.size
        if n <= max_batch and (n == 1 or (n <= 64 and len(set(slots.tolist())) == n)):
            return np.arange(n)  # the common case: every pending session once
        _, first = np.unique(slots, return_index=True)
        if first.size == n and n <= max_batch:
            return np.arange(n)
        return np.sort(first)[:max_batch]


def select(events: Events, where: np.ndarray) -> Events:
    """The rows of ``events`` at ``where`` (positions or a mask)."""
    return {name: column[where] for name, column in events.items()}
