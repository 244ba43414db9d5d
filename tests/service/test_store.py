"""The SQLite state store on its own: round trips, model checks, bad files, expiry."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest

from service.store import StoredRows, StoreError, StoreLayout, StoreMismatchError
from service.store.sqlite import SqliteStore

LAYOUT = StoreLayout("f" * 64, ("hidden", "cell"), (3, 3), 3, 0)


def rows(ids: list[str], step: int = 1, seq: int = 0, now: float = 0.0) -> StoredRows:
    n = len(ids)
    rng = np.random.default_rng(len(ids))
    return StoredRows(
        ids,
        np.full(n, step, np.uint64),
        np.full(n, seq, np.uint64),
        rng.standard_normal((n, LAYOUT.width)).astype(np.float32),
        np.full(n, now or time.time()),
        np.full(n, now or time.time()),
    )


def opened(path: Path, layout: StoreLayout = LAYOUT, start_over: bool = False) -> SqliteStore:
    store = SqliteStore(str(path))
    store.open(layout, start_over)
    return store


def test_rows_round_trip_exactly_and_survive_reopening(tmp_path: Path) -> None:
    store = opened(tmp_path / "s.db")
    saved = rows(["a", "b", "ü"], step=7, seq=2**64 - 1)  # the largest seq a client can send
    store.save(saved)
    store.close()
    store = opened(tmp_path / "s.db")
    got = store.load(["ü", "a", "nope", "b"])
    order = [got.session_ids.index(s) for s in saved.session_ids]
    assert sorted(got.session_ids) == ["a", "b", "ü"]
    assert got.step[order].tolist() == [7, 7, 7]
    assert got.last_seq[order].tolist() == [2**64 - 1] * 3
    np.testing.assert_array_equal(got.blob[order], saved.blob)
    np.testing.assert_array_equal(got.created[order], saved.created)
    store.save(rows(["a"], step=8))  # overwrite
    assert store.load(["a"]).step.tolist() == [8]
    store.delete(["a", "never-there"])
    assert store.load(["a", "b"]).session_ids == ["b"]
    store.close()


def test_sqlite_uses_wal_and_the_requested_sync(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "s.db"), sync="full")
    store.open(LAYOUT, False)
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    store.close()


def test_another_model_is_refused_unless_starting_over(tmp_path: Path) -> None:
    opened(tmp_path / "s.db").save(rows(["a"]))
    other = StoreLayout("e" * 64, ("hidden", "cell"), (3, 3), 3, 0)
    with pytest.raises(StoreMismatchError) as info:
        opened(tmp_path / "s.db", other)
    message = str(info.value)
    assert "holds sessions of model ffffffffffffffff" in message
    assert "this server runs model eeeeeeeeeeeeeeee" in message
    assert "--store-reset" in message
    store = opened(tmp_path / "s.db", other, start_over=True)
    assert store.load(["a"]).session_ids == []
    store.close()
    opened(tmp_path / "s.db", other).close()  # the store now belongs to the other model


def test_not_a_database_fails_clearly(tmp_path: Path) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(b"this is not a database\x00" * 500)
    with pytest.raises(StoreError, match=r"cannot open state store .*not a database"):
        opened(path)
    with pytest.raises(StoreError, match="no directory"):
        opened(tmp_path / "missing" / "s.db")


def test_a_locked_store_fails_the_write_and_keeps_the_old_rows(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "s.db"), timeout=0.05)
    store.open(LAYOUT, False)
    first = rows(["a"], step=1)
    store.save(first)
    other = sqlite3.connect(tmp_path / "s.db", isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    with pytest.raises(StoreError, match="write failed: database is locked"):
        store.save(rows(["a", "b"], step=2))
    with pytest.raises(StoreError, match="probe failed"):
        store.probe()
    other.execute("ROLLBACK")
    store.probe()
    got = store.load(["a", "b"])
    assert got.session_ids == ["a"] and got.step.tolist() == [1]
    np.testing.assert_array_equal(got.blob, first.blob)
    store.close()


def test_expire_deletes_only_idle_rows(tmp_path: Path) -> None:
    store = opened(tmp_path / "s.db")
    store.save(rows(["old1", "old2"], now=1000.0))
    store.save(rows(["fresh"], now=5000.0))
    assert store.expire(2000.0) == 2
    assert store.load(["old1", "old2", "fresh"]).session_ids == ["fresh"]
    store.close()


def test_a_row_of_the_wrong_size_is_an_error_not_a_state(tmp_path: Path) -> None:
    store = opened(tmp_path / "s.db")
    store.save(rows(["a"]))
    store.db.execute("UPDATE sessions SET state = x'00010203' WHERE id = 'a'")
    with pytest.raises(StoreError, match="'a' has a state of the wrong size"):
        store.load(["a"])
    store.close()
