"""Durable session state: the store interface, and its SQLite implementation.

The session table in memory is a cache of the store. A store is called from one
worker thread only (never the event loop); every call blocks and either
succeeds whole or raises ``StoreError`` having changed nothing. To add a store
(Redis, ...): subclass ``StateStore``, implement its six methods with those
promises, and give ``open_store`` a URL scheme for it. The batcher needs nothing else.
A store that other processes write too (``shared``, e.g. Redis) also implements
``swap``, the compare-and-set write the batcher then uses for events.
"""

from __future__ import annotations

import abc
import contextlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

SCHEMA_VERSION = "1"
SQLITE_MAX_VARIABLES = 32766
"""SQLite >= 3.32 binds at most this many parameters in one statement."""


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


@dataclass
class Conflicts:
    """Rows a ``swap`` did not write because the stored row had moved on."""

    index: np.ndarray
    """Positions (int64) in the rows given to ``swap``."""
    current: StoredRows
    """The stored rows now, for those of them that exist (absent ones are left out)."""


class StateStore(abc.ABC):
    """Where sessions outlive the process. Blocking calls, from one worker thread."""

    url: str
    """Where, for logs (no password)."""
    shared = False
    """Other replicas write the same sessions: event writes go through ``swap``."""

    @abc.abstractmethod
    def open(self, layout: StoreLayout, start_over: bool) -> None:
        """Open or create; raises StoreMismatchError for another layout unless ``start_over``,
        which deletes every stored session first."""

    @abc.abstractmethod
    def load(self, session_ids: Sequence[str]) -> StoredRows:
        """The stored rows among ``session_ids`` (distinct), in any order; absent ids left out."""

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


def open_store(
    url: str, sync: str = "normal", timeout: float = 1.0, ttl: float = 0.0
) -> StateStore | None:
    """The store a ``--state-store`` URL names; None for ``memory`` (no store).

    Nothing is connected or opened yet (``StateStore.open`` does that).
    """
    if url in ("", "memory"):
        return None
    if url.startswith(("redis://", "rediss://")):
        from service.redis_store import RedisStore

        try:
            return RedisStore(url, timeout, ttl)
        except ValueError as exc:
            raise ValueError(f"--state-store {url!r}: {exc}") from exc
    if url.startswith("sqlite://"):
        path = url[len("sqlite://") :]
        if not path:
            raise ValueError(
                "--state-store sqlite:// needs a file: sqlite:///var/lib/lstm/state.db"
            )
        return SqliteStore(path, sync, timeout)
    raise ValueError(
        f"--state-store {url!r}: expected memory, sqlite:///path/to/state.db "
        "or redis://HOST:PORT/DB"
    )


def check_url(url: str) -> str | None:
    """Why a ``--state-store`` URL is refused, or None."""
    try:
        open_store(url)
    except ValueError as exc:
        return str(exc)
    return None


def _signed(values: np.ndarray) -> list[int]:
    """uint64 as SQLite's int64 (two's complement), so seqs up to 2**64 - 1 round-trip."""
    return np.ascontiguousarray(values, np.uint64).view(np.int64).tolist()


class SqliteStore(StateStore):
    """One SQLite file in WAL mode; a batch of rows is one ``REPLACE`` transaction.

    ``sync``: ``normal`` survives a crash of the process (the WAL is fsynced at
    checkpoints), ``full`` also a power loss (fsync on every commit).
    """

    def __init__(self, path: str, sync: str = "normal", timeout: float = 1.0):
        if sync not in ("normal", "full"):
            raise ValueError("--store-sync must be normal or full")
        self.path = path
        self.url = f"sqlite://{path}"
        self.sync = sync
        self.timeout = timeout
        self.layout: StoreLayout | None = None
        self._db: sqlite3.Connection | None = None

    @property
    def db(self) -> sqlite3.Connection:
        assert self._db is not None, "open() first"
        return self._db

    def open(self, layout: StoreLayout, start_over: bool) -> None:
        try:
            self._open(layout, start_over)
        except sqlite3.Error as exc:
            self.close()
            raise StoreError(f"cannot open state store {self.path}: {exc}") from exc
        except BaseException:
            self.close()
            raise

    def _open(self, layout: StoreLayout, start_over: bool) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(directory):
            raise StoreError(f"cannot open state store {self.path}: no directory {directory}")
        # isolation_level=None: transactions are begun and ended explicitly below.
        db = sqlite3.connect(
            self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False
        )
        self._db = db
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            raise StoreError(f"state store {self.path}: cannot use WAL mode (got {mode})")
        db.execute(f"PRAGMA synchronous={self.sync.upper()}")
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(
                "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
            )
            db.execute(
                "CREATE TABLE IF NOT EXISTS sessions ("
                " id TEXT PRIMARY KEY,"
                " step INTEGER NOT NULL,"  # uint64 as int64 two's complement
                " last_seq INTEGER NOT NULL,"
                " state BLOB NOT NULL,"  # float32 LE, laid out as meta 'layout' says
                " created REAL NOT NULL,"
                " updated REAL NOT NULL"
                ") WITHOUT ROWID"
            )
            db.execute("CREATE INDEX IF NOT EXISTS sessions_updated ON sessions (updated)")
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
            stored = meta.get("layout")
            if stored is not None and stored != layout.to_json() and not start_over:
                raise StoreMismatchError(
                    f"state store {self.path} holds sessions of "
                    f"{StoreLayout.from_json(stored).describe()}; this server runs "
                    f"{layout.describe()}. Start with --store-reset to delete the stored "
                    "sessions and start over, or use another --state-store file."
                )
            if start_over:
                deleted = db.execute("DELETE FROM sessions").rowcount
                log.warning("--store-reset: deleted %d stored sessions from %s", deleted, self.path)
            db.executemany(
                "REPLACE INTO meta (key, value) VALUES (?, ?)",
                [("layout", layout.to_json()), ("schema", SCHEMA_VERSION)],
            )
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        self.layout = layout

    def _fail(self, what: str, exc: sqlite3.Error) -> StoreError:
        with contextlib.suppress(sqlite3.Error):
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
        return StoreError(f"state store {what} failed: {exc}")

    def load(self, session_ids: Sequence[str]) -> StoredRows:
        assert self.layout is not None
        found: list[tuple[str, int, int, bytes, float, float]] = []
        try:
            for lo in range(0, len(session_ids), SQLITE_MAX_VARIABLES):
                chunk = session_ids[lo : lo + SQLITE_MAX_VARIABLES]
                marks = ",".join("?" * len(chunk))
                found += self.db.execute(
                    "SELECT id, step, last_seq, state, created, updated FROM sessions"
                    f" WHERE id IN ({marks})",
                    chunk,
                ).fetchall()
        except sqlite3.Error as exc:
            raise self._fail("read", exc) from exc
        width = self.layout.width
        if not found:
            return StoredRows(
                [],
                np.zeros(0, np.uint64),
                np.zeros(0, np.uint64),
                np.zeros((0, width), np.float32),
                np.zeros(0),
                np.zeros(0),
            )
        ids, steps, seqs, blobs, created, updated = zip(*found)
        bad = [sid for sid, b in zip(ids, blobs) if len(b) != 4 * width]
        if bad:
            raise StoreError(
                f"state store read failed: session {bad[0]!r} has a state of the wrong size"
            )
        return StoredRows(
            list(ids),
            np.array(steps, np.int64).view(np.uint64),
            np.array(seqs, np.int64).view(np.uint64),
            np.frombuffer(b"".join(blobs), "<f4").reshape(len(ids), width),
            np.array(created, np.float64),
            np.array(updated, np.float64),
        )

    def save(self, rows: StoredRows) -> None:
        blob = np.ascontiguousarray(rows.blob, "<f4")
        data = blob.tobytes()
        w = blob.shape[1] * 4
        try:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany(
                "REPLACE INTO sessions (id, step, last_seq, state, created, updated)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                zip(
                    rows.session_ids,
                    _signed(rows.step),
                    _signed(rows.last_seq),
                    [data[i : i + w] for i in range(0, len(data), w)],
                    rows.created.tolist(),
                    rows.updated.tolist(),
                ),
            )
            self.db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise self._fail("write", exc) from exc

    def delete(self, session_ids: Sequence[str]) -> None:
        try:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany("DELETE FROM sessions WHERE id = ?", ((s,) for s in session_ids))
            self.db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise self._fail("delete", exc) from exc

    def expire(self, older_than: float) -> int:
        try:
            self.db.execute("BEGIN IMMEDIATE")
            n = self.db.execute("DELETE FROM sessions WHERE updated < ?", (older_than,)).rowcount
            self.db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise self._fail("expiry", exc) from exc
        return int(n)

    def probe(self) -> None:
        try:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("REPLACE INTO meta (key, value) VALUES ('probed', ?)", (time.time(),))
            self.db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise self._fail("probe", exc) from exc

    def close(self) -> None:
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None
