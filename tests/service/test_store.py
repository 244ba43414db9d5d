"""The SQLite state store on its own: round trips, versions, layout checks, bad files, expiry."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest

from service.store import StoredRows, StoreError, StoreLayout, StoreMismatchError
from service.store.sqlite import SqliteStore

LAYOUT = StoreLayout("f" * 64, ("hidden", "cell"), (3, 3), 3, 0)
MODEL = "m"


def rows(
    ids: list[str], step: int = 1, seq: int = 0, now: float = 0.0, version: int = 1
) -> StoredRows:
    n = len(ids)
    rng = np.random.default_rng(len(ids))
    return StoredRows(
        ids,
        np.full(n, step, np.uint64),
        np.full(n, seq, np.uint64),
        rng.standard_normal((n, LAYOUT.width)).astype(np.float32),
        np.full(n, now or time.time()),
        np.full(n, now or time.time()),
        version,
    )


def loaded(store: SqliteStore | object, ids: list[str], model: str = MODEL) -> StoredRows:
    """The stored rows of one version (the test stores one at a time)."""
    found = store.load(model, ids)  # type: ignore[attr-defined]
    assert len(found) <= 1, [f.version for f in found]
    return found[0] if found else StoredRows.empty(LAYOUT.width)


def opened(
    path: Path, layout: StoreLayout = LAYOUT, start_over: bool = False, version: int = 1
) -> SqliteStore:
    store = SqliteStore(str(path))
    store.open(start_over, "legacy")
    store.register(MODEL, version, layout)
    return store


def test_rows_round_trip_exactly_and_survive_reopening(tmp_path: Path) -> None:
    store = opened(tmp_path / "s.db")
    saved = rows(["a", "b", "ü"], step=7, seq=2**64 - 1)  # the largest seq a client can send
    store.save(MODEL, saved)
    store.close()
    store = opened(tmp_path / "s.db")
    got = loaded(store, ["ü", "a", "nope", "b"])
    order = [got.session_ids.index(s) for s in saved.session_ids]
    assert sorted(got.session_ids) == ["a", "b", "ü"] and got.version == 1
    assert got.step[order].tolist() == [7, 7, 7]
    assert got.last_seq[order].tolist() == [2**64 - 1] * 3
    np.testing.assert_array_equal(got.blob[order], saved.blob)
    np.testing.assert_array_equal(got.created[order], saved.created)
    store.save(MODEL, rows(["a"], step=8))  # overwrite
    assert loaded(store, ["a"]).step.tolist() == [8]
    store.delete(MODEL, ["a", "never-there"])
    assert loaded(store, ["a", "b"]).session_ids == ["b"]
    store.close()


def test_rows_carry_their_version_and_models_are_apart(tmp_path: Path) -> None:
    store = opened(tmp_path / "s.db")
    wider = StoreLayout("e" * 64, ("hidden",), (5,), 2, None)
    store.register(MODEL, 2, wider)
    store.register("other", 1, LAYOUT)
    store.save(MODEL, rows(["a", "b"]))
    two = StoredRows(
        ["c"], np.ones(1, np.uint64), np.zeros(1, np.uint64), np.ones((1, 7), np.float32),
        np.ones(1), np.ones(1), 2,
    )  # fmt: skip
    store.save(MODEL, two)
    store.save("other", rows(["a"], step=9))
    found = {r.version: r for r in store.load(MODEL, ["a", "b", "c"])}
    assert sorted(found) == [1, 2]
    assert sorted(found[1].session_ids) == ["a", "b"] and found[2].session_ids == ["c"]
    assert found[2].blob.shape == (1, wider.width)
    assert store.versions(MODEL) == {1, 2} and store.versions("other") == {1}
    assert loaded(store, ["a"], "other").step.tolist() == [9]  # the same id: another session
    assert store.layouts(MODEL) == {1: LAYOUT, 2: wider}
    store.close()
    store = opened(tmp_path / "s.db")
    assert store.layouts(MODEL) == {1: LAYOUT, 2: wider}  # recorded in the file
    store.close()


def test_sqlite_uses_wal_and_the_requested_sync(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "s.db"), sync="full")
    store.open(False, "legacy")
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    store.close()


def test_another_layout_for_a_version_with_rows_is_refused_unless_starting_over(
    tmp_path: Path,
) -> None:
    opened(tmp_path / "s.db").save(MODEL, rows(["a"]))
    other = StoreLayout("e" * 64, ("hidden", "cell"), (3, 3), 3, 0)
    with pytest.raises(StoreMismatchError) as info:
        opened(tmp_path / "s.db", other)
    message = str(info.value)
    assert "holds sessions of 'm' version 1 of model ffffffffffffffff" in message
    assert "this version is model eeeeeeeeeeeeeeee" in message
    assert "--store-reset" in message
    opened(tmp_path / "s.db", other, version=2).close()  # another version number: fine
    store = opened(tmp_path / "s.db", other, start_over=True)
    assert loaded(store, ["a"]).session_ids == []
    store.close()
    opened(tmp_path / "s.db", other).close()  # the version now belongs to the other weights


def test_a_layout_without_rows_is_replaced(tmp_path: Path) -> None:
    opened(tmp_path / "s.db").close()  # recorded, never used
    other = StoreLayout("e" * 64, ("hidden",), (4,), 4, 0)
    store = opened(tmp_path / "s.db", other)
    assert store.layouts(MODEL) == {1: other}
    store.close()


def test_a_file_of_the_one_model_release_is_kept_as_version_1(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        "CREATE TABLE sessions (id TEXT PRIMARY KEY, step INTEGER NOT NULL,"
        " last_seq INTEGER NOT NULL, state BLOB NOT NULL, created REAL NOT NULL,"
        " updated REAL NOT NULL) WITHOUT ROWID;"
    )
    blob = np.arange(LAYOUT.width, dtype="<f4").tobytes()
    db.execute("INSERT INTO sessions VALUES ('a', 3, 2, ?, 1.0, 2.0)", (blob,))
    db.execute("INSERT INTO meta VALUES ('layout', ?), ('schema', '1')", (LAYOUT.to_json(),))
    db.commit()
    db.close()
    store = SqliteStore(str(path))
    store.open(False, "lstm")
    assert store.layouts("lstm") == {1: LAYOUT}
    (got,) = store.load("lstm", ["a"])
    assert got.version == 1 and got.step.tolist() == [3] and got.last_seq.tolist() == [2]
    np.testing.assert_array_equal(got.blob[0], np.arange(LAYOUT.width, dtype=np.float32))
    schema = store.db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()[0]
    assert json.loads(schema) == 2
    store.close()


def test_not_a_database_fails_clearly(tmp_path: Path) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(b"this is not a database\x00" * 500)
    with pytest.raises(StoreError, match=r"cannot open state store .*not a database"):
        opened(path)
    with pytest.raises(StoreError, match="no directory"):
        opened(tmp_path / "missing" / "s.db")


def test_a_locked_store_fails_the_write_and_keeps_the_old_rows(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "s.db"), timeout=0.05)
    store.open(False, "legacy")
    store.register(MODEL, 1, LAYOUT)
    first = rows(["a"], step=1)
    store.save(MODEL, first)
    other = sqlite3.connect(tmp_path / "s.db", isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    with pytest.raises(StoreError, match="write failed: database is locked"):
        store.save(MODEL, rows(["a", "b"], step=2))
    with pytest.raises(StoreError, match="probe failed"):
        store.probe()
    other.execute("ROLLBACK")
    store.probe()
    got = loaded(store, ["a", "b"])
    assert got.session_ids == ["a"] and got.step.tolist() == [1]
    np.testing.assert_array_equal(got.blob, first.blob)
    store.close()


def test_expire_deletes_only_idle_rows(tmp_path: Path) -> None:
    store = opened(tmp_path / "s.db")
    store.save(MODEL, rows(["old1", "old2"], now=1000.0))
    store.save(MODEL, rows(["fresh"], now=5000.0))
    assert store.expire(2000.0) == 2
    assert loaded(store, ["old1", "old2", "fresh"]).session_ids == ["fresh"]
    store.close()


def test_a_row_of_the_wrong_size_is_an_error_not_a_state(tmp_path: Path) -> None:
    store = opened(tmp_path / "s.db")
    store.save(MODEL, rows(["a"]))
    store.db.execute("UPDATE rows SET state = x'00010203' WHERE id = 'a'")
    with pytest.raises(StoreError, match="'a' has a state of the wrong size"):
        store.load(MODEL, ["a"])
    store.close()
