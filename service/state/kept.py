"""The events each session keeps, in a ring per row, to replay them on a new model version."""

from __future__ import annotations

import numpy as np


class KeptEvents:
    """Each row's last ``k`` events (the oldest overwritten), with the ring's head and count.

    As the store keeps them, a row's part is ``[k * e + 2]`` float32: the ring in
    slot order, then the head and the count.
    """

    def __init__(self, k: int, e: int):
        self.k = k
        self.e = e
        self.ring = np.zeros((0, k, e), np.float32)
        self.head = np.zeros(0, np.int32)
        self.count = np.zeros(0, np.int32)

    @property
    def width(self) -> int:
        return self.k * self.e + 2

    def grow(self, capacity: int) -> None:
        old = self.head.size
        for name in ("ring", "head", "count"):
            a = getattr(self, name)
            b = np.zeros((capacity, *a.shape[1:]), a.dtype)
            b[:old] = a[:old]
            setattr(self, name, b)

    def clear(self, slots: np.ndarray | int) -> None:
        """Nothing kept (a new session, a reset, a written state)."""
        self.count[slots] = 0
        self.head[slots] = 0

    def record(self, slots: np.ndarray, values: np.ndarray, resets: np.ndarray | None) -> None:
        """Keep a run's events (distinct slots); a reset starts a row's ring over."""
        if resets is not None and resets.any():
            self.count[slots[resets]] = 0
        head = self.head[slots]
        self.ring[slots, head] = values
        self.head[slots] = (head + 1) % self.k
        self.count[slots] = np.minimum(self.count[slots] + 1, self.k)

    def of(self, slots: np.ndarray) -> np.ndarray:
        """The rows' kept events as the store keeps them: ``[n, width]``."""
        n = slots.size
        out = np.empty((n, self.width), np.float32)
        out[:, :-2] = self.ring[slots].reshape(n, -1)
        out[:, -2] = self.head[slots]
        out[:, -1] = self.count[slots]
        return out

    def after(self, slots: np.ndarray, values: np.ndarray, resets: np.ndarray | None) -> np.ndarray:
        """``of`` as it will be once ``record`` has kept these events (nothing changes)."""
        out = self.of(slots)
        n = slots.size
        count = self.count[slots].copy()
        if resets is not None:
            count[resets] = 0
        head = self.head[slots]
        ring = self.ring[slots]  # a copy (fancy index)
        ring[np.arange(n), head] = values
        out[:, :-2] = ring.reshape(n, -1)
        out[:, -2] = (head + 1) % self.k
        out[:, -1] = np.minimum(count + 1, self.k)
        return out

    def load(self, slots: np.ndarray, kept: np.ndarray) -> None:
        """Fill rows from the store's form (``of``)."""
        n = slots.size
        self.ring[slots] = kept[:, :-2].reshape(n, self.k, self.e)
        self.head[slots] = kept[:, -2].astype(np.int32)
        self.count[slots] = kept[:, -1].astype(np.int32)

    def events_of(self, slot: int) -> np.ndarray:
        """One row's kept events, oldest first: ``[count, e]``."""
        n = int(self.count[slot])
        at = (int(self.head[slot]) - n + np.arange(n)) % self.k
        return self.ring[slot, at].copy()
