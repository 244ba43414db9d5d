"""The SQLite state store: one file in WAL mode, a batch of rows one transaction."""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Sequence

import numpy as np

from service.store.base import (
    StateStore,
    StoredRows,
    StoreError,
    StoreLayout,
    StoreMismatchError,
    mismatch,
)

log = logging.getLogger(__name__)

SCHEMA_VERSION = "2"
"""1: one model, rows keyed by id; 2: rows keyed by (model, id), each with its version."""
SQLITE_MAX_VARIABLES = 32766
"""SQLite >= 3.32 binds at most this many parameters in one statement."""

_CREATE = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS rows ("
    " model TEXT NOT NULL,"
    " id TEXT NOT NULL,"
    " version INTEGER NOT NULL,"
    " step INTEGER NOT NULL,"  # uint64 as int64 two's complement
    " last_seq INTEGER NOT NULL,"
    " state BLOB NOT NULL,"  # float32 LE, laid out as meta 'layout/<model>/<version>' says
    " created REAL NOT NULL,"
    " updated REAL NOT NULL,"
    " PRIMARY KEY (model, id)"
    ") WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS rows_updated ON rows (updated)",
    "CREATE INDEX IF NOT EXISTS rows_version ON rows (model, version)",
)


def _signed(values: np.ndarray) -> list[int]:
    """uint64 as SQLite's int64 (two's complement), so seqs up to 2**64 - 1 round-trip."""
    return np.ascontiguousarray(values, np.uint64).view(np.int64).tolist()


def _layout_key(model: str, version: int) -> str:
    return f"layout/{model}/{version}"


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
        self._layouts: dict[tuple[str, int], StoreLayout] = {}
        self._db: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        """A second connection for ``load``: WAL readers never wait for the writer."""

    @property
    def db(self) -> sqlite3.Connection:
        assert self._db is not None, "open() first"
        return self._db

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: transactions are begun and ended explicitly.
        return sqlite3.connect(
            self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False
        )

    def open(self, start_over: bool, legacy_model: str) -> None:
        try:
            self._open(start_over, legacy_model)
        except sqlite3.Error as exc:
            self.close()
            raise StoreError(f"cannot open state store {self.path}: {exc}") from exc
        except BaseException:
            self.close()
            raise

    def _open(self, start_over: bool, legacy_model: str) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(directory):
            raise StoreError(f"cannot open state store {self.path}: no directory {directory}")
        db = self._db = self._connect()
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            raise StoreError(f"state store {self.path}: cannot use WAL mode (got {mode})")
        db.execute(f"PRAGMA synchronous={self.sync.upper()}")
        db.execute("BEGIN IMMEDIATE")
        try:
            for statement in _CREATE:
                db.execute(statement)
            self._adopt_schema_1(db, legacy_model)
            if start_over:
                deleted = db.execute("DELETE FROM rows").rowcount
                db.execute("DELETE FROM meta WHERE key LIKE 'layout/%'")
                log.warning("--store-reset: deleted %d stored sessions from %s", deleted, self.path)
            db.execute("REPLACE INTO meta (key, value) VALUES ('schema', ?)", (SCHEMA_VERSION,))
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        self._layouts = {}
        for key, value in db.execute("SELECT key, value FROM meta WHERE key LIKE 'layout/%'"):
            _, model, version = key.rsplit("/", 2)
            self._layouts[(model, int(version))] = StoreLayout.from_json(value)
        self._reader = self._connect()

    def _adopt_schema_1(self, db: sqlite3.Connection, legacy_model: str) -> None:
        """A file of the one-model release: its sessions become version 1 of ``legacy_model``."""
        old = db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'sessions'"
        ).fetchone()
        if old is None:
            return
        layout = db.execute("SELECT value FROM meta WHERE key = 'layout'").fetchone()
        moved = db.execute(
            "INSERT OR REPLACE INTO rows"
            " SELECT ?, id, 1, step, last_seq, state, created, updated FROM sessions",
            (legacy_model,),
        ).rowcount
        db.execute("DROP TABLE sessions")
        if layout is not None:
            db.execute(
                "REPLACE INTO meta (key, value) VALUES (?, ?)",
                (_layout_key(legacy_model, 1), layout[0]),
            )
            db.execute("DELETE FROM meta WHERE key = 'layout'")
        log.info(
            "state store %s: %d sessions of the one-model format kept as %r version 1",
            self.path,
            moved,
            legacy_model,
        )

    def register(self, model: str, version: int, layout: StoreLayout) -> None:
        stored = self._layouts.get((model, version))
        if stored == layout:
            return
        try:
            if stored is not None:
                held = self.db.execute(
                    "SELECT 1 FROM rows WHERE model = ? AND version = ? LIMIT 1", (model, version)
                ).fetchone()
                if held is not None:
                    raise StoreMismatchError(mismatch(self.path, model, version, stored, layout))
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute(
                "REPLACE INTO meta (key, value) VALUES (?, ?)",
                (_layout_key(model, version), layout.to_json()),
            )
            self.db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise self._fail("write", exc) from exc
        self._layouts[(model, version)] = layout

    def layouts(self, model: str) -> dict[int, StoreLayout]:
        return {v: layout for (m, v), layout in self._layouts.items() if m == model}

    def versions(self, model: str) -> set[int]:
        try:
            found = self._read_db.execute(
                "SELECT DISTINCT version FROM rows WHERE model = ?", (model,)
            ).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"state store read failed: {exc}") from exc
        return {int(v) for (v,) in found}

    @property
    def _read_db(self) -> sqlite3.Connection:
        assert self._reader is not None, "open() first"
        return self._reader

    def _fail(self, what: str, exc: sqlite3.Error) -> StoreError:
        with contextlib.suppress(sqlite3.Error):
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
        return StoreError(f"state store {what} failed: {exc}")

    def load(self, model: str, session_ids: Sequence[str]) -> list[StoredRows]:
        found: list[tuple[str, int, int, int, bytes, float, float]] = []
        try:
            for lo in range(0, len(session_ids), SQLITE_MAX_VARIABLES - 1):
                chunk = session_ids[lo : lo + SQLITE_MAX_VARIABLES - 1]
                marks = ",".join("?" * len(chunk))
                found += self._read_db.execute(
                    "SELECT id, version, step, last_seq, state, created, updated FROM rows"
                    f" WHERE model = ? AND id IN ({marks})",
                    (model, *chunk),
                ).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"state store read failed: {exc}") from exc
        by_version: dict[int, list[tuple[str, int, int, int, bytes, float, float]]] = {}
        for row in found:
            by_version.setdefault(int(row[1]), []).append(row)
        return [self._rows(model, version, rows) for version, rows in by_version.items()]

    def _rows(
        self, model: str, version: int, found: list[tuple[str, int, int, int, bytes, float, float]]
    ) -> StoredRows:
        layout = self._layouts.get((model, version))
        if layout is None:
            raise StoreError(
                f"state store read failed: sessions of {model!r} version {version} have no "
                "recorded layout"
            )
        ids, _, steps, seqs, blobs, created, updated = zip(*found)
        width = layout.width
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
            version,
        )

    def save(self, model: str, rows: StoredRows) -> None:
        blob = np.ascontiguousarray(rows.blob, "<f4")
        data = blob.tobytes()
        w = blob.shape[1] * 4
        n = len(rows)
        try:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany(
                "REPLACE INTO rows (model, id, version, step, last_seq, state, created, updated)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                zip(
                    [model] * n,
                    rows.session_ids,
                    [rows.version] * n,
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

    def delete(self, model: str, session_ids: Sequence[str]) -> None:
        try:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany(
                "DELETE FROM rows WHERE model = ? AND id = ?", ((model, s) for s in session_ids)
            )
            self.db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise self._fail("delete", exc) from exc

    def expire(self, older_than: float) -> int:
        try:
            self.db.execute("BEGIN IMMEDIATE")
            n = self.db.execute("DELETE FROM rows WHERE updated < ?", (older_than,)).rowcount
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
