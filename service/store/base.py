"""The state store interface and the row types every store speaks; no implementation here.

The session table in memory is a cache of the store. Writes come from one
thread (the store's writer), reads of sessions not in memory from a second one
(so a slow read never holds up the writes of warm sessions); never the event
loop. Every call blocks and either succeeds whole or raises ``StoreError``
having changed nothing.

Sessions are keyed by (model, key) — the key being the tenant's id, see
``state.keys`` — and each row records the version of the model it is pinned
to; a version's row layout is recorded once (``register``) and checked.
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
    """The store holds sessions of this model version computed by other weights or laid
    out otherwise; that version cannot serve them."""


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
    replay_events: int = 0
    """Events kept per session to replay on a new version (``retire_policy replay``)."""
    event_size: int = 0
    """Values per kept event (needed when ``replay_events``)."""

    @property
    def state_width(self) -> int:
        """float32 values of the states and output (the blob without the kept events)."""
        return sum(self.state_sizes) + (0 if self.output_state is not None else self.output_size)

    @property
    def width(self) -> int:
        """float32 values in one row's blob: states, output, then the kept events with their
        ring position and count."""
        kept = self.replay_events * self.event_size + 2 if self.replay_events else 0
        return self.state_width + kept

    def join(
        self, states: Sequence[np.ndarray], output: np.ndarray, kept: np.ndarray | None = None
    ) -> np.ndarray:
        """Rows' blobs ``[n, width]`` from their states, output and (replay) kept events,
        ``kept`` being ``[n, replay_events * event_size + 2]`` (events, head, count)."""
        parts = list(states) if self.output_state is not None else [*states, output]
        if self.replay_events:
            n = output.shape[0]
            width = self.width - self.state_width
            parts.append(kept if kept is not None else np.zeros((n, width), np.float32))
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
        return states, blob[:, offset : offset + self.output_size]

    def kept(self, blob: np.ndarray) -> np.ndarray | None:
        """The kept events' part of rows' blobs (a view), or None without replay."""
        return blob[:, self.state_width :] if self.replay_events else None

    def same_states(self, other: StoreLayout) -> bool:
        """Both lay states out alike: one's state can be carried to the other as is."""
        return (self.state_names, self.state_sizes) == (other.state_names, other.state_sizes)

    def describe(self) -> str:
        states = ", ".join(f"{n}[{s}]" for n, s in zip(self.state_names, self.state_sizes))
        kept = f", {self.replay_events} events kept" if self.replay_events else ""
        return (
            f"model {self.model[:16] or '?'} with states {states}, output[{self.output_size}]{kept}"
        )

    def to_json(self) -> str:
        return json.dumps(
            {
                "model": self.model,
                "state_names": list(self.state_names),
                "state_sizes": list(self.state_sizes),
                "output_size": self.output_size,
                "output_state": self.output_state,
                "replay_events": self.replay_events,
                "event_size": self.event_size,
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
            d.get("replay_events", 0),
            d.get("event_size", 0),
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
    version: int = 1
    """The model version every one of these rows is pinned to."""

    def __len__(self) -> int:
        return len(self.session_ids)

    @classmethod
    def empty(cls, width: int, version: int = 1) -> StoredRows:
        return cls(
            [],
            np.zeros(0, np.uint64),
            np.zeros(0, np.uint64),
            np.zeros((0, width), np.float32),
            np.zeros(0),
            np.zeros(0),
            version,
        )

    @classmethod
    def one(
        cls,
        session_id: str,
        step: int,
        last_seq: int,
        blob: np.ndarray,
        created: float,
        now: float,
        version: int = 1,
    ) -> StoredRows:
        return cls(
            [session_id],
            np.array([step], np.uint64),
            np.array([last_seq], np.uint64),
            blob,
            np.array([created]),
            np.array([now]),
            version,
        )

    def take(self, index: np.ndarray | list[int]) -> StoredRows:
        """These rows at ``index`` (positions)."""
        at = np.asarray(index, np.int64)
        return StoredRows(
            [self.session_ids[i] for i in at.tolist()],
            self.step[at],
            self.last_seq[at],
            self.blob[at],
            self.created[at],
            self.updated[at],
            self.version,
        )


@dataclass
class Conflicts:
    """Rows a ``swap`` did not write because the stored row had moved on."""

    index: np.ndarray
    """Positions (int64) in the rows given to ``swap``."""
    current: list[StoredRows]
    """The stored rows now, for those of them that exist (absent ones are left out), by version
    (another replica may have moved a session to another version)."""


class StateStore(abc.ABC):
    """Where sessions outlive the process. Blocking calls, from the store's threads."""

    url: str
    """Where, for logs (no password)."""
    shared = False
    """Other replicas write the same sessions: event writes go through ``swap``."""
    persistent = True
    """False only for the null store: nothing outlives the process, nothing to read back."""

    @abc.abstractmethod
    def open(self, start_over: bool, legacy_model: str) -> None:
        """Open or create; ``start_over`` deletes every stored session first. Rows a release
        before model versions wrote are adopted as version 1 of ``legacy_model``."""

    @abc.abstractmethod
    def register(self, model: str, version: int, layout: StoreLayout) -> None:
        """Record how a version's rows are laid out; StoreMismatchError when the store holds
        rows of that version laid out otherwise or computed by other weights."""

    @abc.abstractmethod
    def layouts(self, model: str) -> dict[int, StoreLayout]:
        """Every version of ``model`` whose layout was recorded, loaded now or not."""

    @abc.abstractmethod
    def versions(self, model: str) -> set[int]:
        """The versions of ``model`` that stored rows are pinned to."""

    @abc.abstractmethod
    def load(self, model: str, session_ids: Sequence[str]) -> list[StoredRows]:
        """The stored rows among ``session_ids`` (distinct), one ``StoredRows`` per version,
        in any order; absent ids left out.

        Called from the reader thread, possibly while the writer thread writes."""

    @abc.abstractmethod
    def save(self, model: str, rows: StoredRows) -> None:
        """Create or overwrite these rows (pinned to ``rows.version``), in one transaction."""

    def swap(
        self, model: str, rows: StoredRows, prev_step: np.ndarray, prev_updated: np.ndarray
    ) -> Conflicts:
        """Write each row only if its stored row still has ``prev_step`` and ``prev_updated``
        (step 0: or there is none); one atomic call. Needed when ``shared``."""
        raise NotImplementedError(f"{type(self).__name__} is not a shared store")

    @abc.abstractmethod
    def delete(self, model: str, session_ids: Sequence[str]) -> None:
        """Remove these sessions (absent ones are ignored)."""

    @abc.abstractmethod
    def expire(self, older_than: float) -> int:
        """Remove sessions of every model last updated before ``older_than``; how many."""

    @abc.abstractmethod
    def probe(self) -> None:
        """A small write that raises StoreError while the store cannot take writes."""

    @abc.abstractmethod
    def close(self) -> None: ...


def mismatch(where: str, model: str, version: int, stored: StoreLayout, new: StoreLayout) -> str:
    """Why a version cannot take over the rows stored for it (the StoreMismatchError text)."""
    return (
        f"state store {where} holds sessions of {model!r} version {version} of "
        f"{stored.describe()}; this version is {new.describe()}. Give the new weights a new "
        "version number, or start with --store-reset to delete every stored session."
    )
