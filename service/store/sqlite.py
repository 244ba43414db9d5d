"""The SQLite state store: one file in WAL mode, a batch of rows one transaction."""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Sequence

import numpy as np

from service.store.base import StateStore, StoredRows, StoreError, StoreLayout, StoreMismatchError

log = logging.getLogger(__name__)

SCHEMA_VERSION = "1"
SQLITE_MAX_VARIABLES = 32766
"""SQLite >= 3.32 binds at most this many parameters in one statement."""


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
        self._reader: sqlite3.Connection | None = None
        """A second connection for ``load``: WAL readers never wait for the writer."""

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
        self._reader = sqlite3.connect(
            self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False
        )
        self.layout = layout

    def _fail(self, what: str, exc: sqlite3.Error) -> StoreError:
        with contextlib.suppress(sqlite3.Error):
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
        return StoreError(f"state store {what} failed: {exc}")

    def load(self, session_ids: Sequence[str]) -> StoredRows:
        assert self.layout is not None and self._reader is not None, "open() first"
        found: list[tuple[str, int, int, bytes, float, float]] = []
        try:
            for lo in range(0, len(session_ids), SQLITE_MAX_VARIABLES):
                chunk = session_ids[lo : lo + SQLITE_MAX_VARIABLES]
                marks = ",".join("?" * len(chunk))
                found += self._reader.execute(
                    "SELECT id, step, last_seq, state, created, updated FROM sessions"
                    f" WHERE id IN ({marks})",
                    chunk,
                ).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"state store read failed: {exc}") from exc
        width = self.layout.width
        if not found:
            return StoredRows.empty(width)
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
        for db in (self._db, self._reader):
            if db is not None:
                with contextlib.suppress(sqlite3.Error):
                    db.close()
        self._db = self._reader = None
