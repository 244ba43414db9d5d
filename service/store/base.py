"""The state store interface and the row types every store speaks; no implementation here.

The session table in memory is a cache of the store. Writes come from one
thread (the store's writer), reads of sessions not in memory from a second one
(so a slow read never holds up the writes of warm sessions); never the event
loop. Every call blocks and either succeeds whole or raises ``StoreError``
having changed nothing.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


class StoreError(Exception):
    """A store operation failed (locked, disk full, I/O error, corrupt file); nothing changed."""


class StoreMismatchError(Exception):
    """The store holds sessions of another model; the server refuses to start on it."""


@dataclass(frozen=True)
class StoreLayout:
    """What the stored rows mean: which model, and how a row's state blob is laid out.

    The blob is float32 little-endian: each state tensor in model order, then the
    output when the output is not one of the states.
    """

    model: str
    """The model's parameter fingerprint (or a hash of the model file when it has none)."""
    state_names: tuple[str, ...]
    state_sizes: tuple[int, ...]
    output_size: int
    output_state: int | None
    """Index of the state that *is* the output (plain LSTM: hidden); None: stored after them."""

    @property
    def width(self) -> int:
        """float32 values in one row's blob."""
        return sum(self.state_sizes) + (0 if self.output_state is not None else self.output_size)

    def join(self, states: Sequence[np.ndarray], output: np.ndarray) -> np.ndarray:
        """Rows' blobs ``[n, width]`` from their states and output."""
        parts = list(states) if self.output_state is not None else [*states, output]
        return np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]

    def split(self, blob: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        """States and output (views) of rows' blobs ``[n, width]``."""
        states = []
        offset = 0
        for size in self.state_sizes:
            states.append(blob[:, offset : offset + size])
            offset += size
        if self.output_state is not None:
            return states, states[self.output_state]
        return states, blob[:, offset:]

    def describe(self) -> str:
        states = ", ".join(f"{n}[{s}]" for n, s in zip(self.state_names, self.state_sizes))
        return f"model {self.model[:16] or '?'} with states {states}, output[{self.output_size}]"

    def to_json(self) -> str:
        return json.dumps(
            {
                "model": self.model,
                "state_names": list(self.state_names),
                "state_sizes": list(self.state_sizes),
                "output_size": self.output_size,
                "output_state": self.output_state,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> StoreLayout:
        d = json.loads(text)
        return cls(
            d["model"],
            tuple(d["state_names"]),
            tuple(d["state_sizes"]),
            d["output_size"],
            d["output_state"],
        )


@dataclass
class StoredRows:
    """Sessions as columns: ``n`` ids, counters, ``blob [n, layout.width]`` float32, times."""

    session_ids: list[str]
    step: np.ndarray
    """uint64"""
    last_seq: np.ndarray
    """uint64"""
    blob: np.ndarray
    created: np.ndarray
    updated: np.ndarray

    def __len__(self) -> int:
        return len(self.session_ids)

    @classmethod
    def empty(cls, width: int) -> StoredRows:
        return cls(
            [],
            np.zeros(0, np.uint64),
            np.zeros(0, np.uint64),
            np.zeros((0, width), np.float32),
            np.zeros(0),
            np.zeros(0),
        )

    @classmethod
    def one(
        cls, session_id: str, step: int, last_seq: int, blob: np.ndarray, created: float, now: float
    ) -> StoredRows:
        return cls(
            [session_id],
            np.array([step], np.uint64),
            np.array([last_seq], np.uint64),
            blob,
            np.array([created]),
            np.array([now]),
        )


@dataclass
class Conflicts:
    """Rows a ``swap`` did not write because the stored row had moved on."""

    index: np.ndarray
    """Positions (int64) in the rows given to ``swap``."""
    current: StoredRows
    """The stored rows now, for those of them that exist (absent ones are left out)."""


class StateStore(abc.ABC):
    """Where sessions outlive the process. Blocking calls, from the store's threads."""

    url: str
    """Where, for logs (no password)."""
    shared = False
    """Other replicas write the same sessions: event writes go through ``swap``."""
    persistent = True
    """False only for the null store: nothing outlives the process, nothing to read back."""

    @abc.abstractmethod
    def open(self, layout: StoreLayout, start_over: bool) -> None:
        """Open or create; raises StoreMismatchError for another layout unless ``start_over``,
        which deletes every stored session first."""

    @abc.abstractmethod
    def load(self, session_ids: Sequence[str]) -> StoredRows:
        """The stored rows among ``session_ids`` (distinct), in any order; absent ids left out.

        Called from the reader thread, possibly while the writer thread writes."""

    @abc.abstractmethod
    def save(self, rows: StoredRows) -> None:
        """Create or overwrite these rows, all in one transaction."""

    def swap(self, rows: StoredRows, prev_step: np.ndarray, prev_updated: np.ndarray) -> Conflicts:
        """Write each row only if its stored row still has ``prev_step`` and ``prev_updated``
        (step 0: or there is none); one atomic call. Needed when ``shared``."""
        raise NotImplementedError(f"{type(self).__name__} is not a shared store")

    @abc.abstractmethod
    def delete(self, session_ids: Sequence[str]) -> None:
        """Remove these sessions (absent ones are ignored)."""

    @abc.abstractmethod
    def expire(self, older_than: float) -> int:
        """Remove sessions last updated before ``older_than`` (Unix time); how many."""

    @abc.abstractmethod
    def probe(self) -> None:
        """A small write that raises StoreError while the store cannot take writes."""

    @abc.abstractmethod
    def close(self) -> None: ...
