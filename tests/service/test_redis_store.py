"""The Redis state store on its own, against Debian's redis-server: round trips, the
compare-and-set, model checks, expiry, failures."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from lstm_bench.cluster import RedisServer
from service.store import StoredRows, StoreError, StoreLayout, StoreMismatchError, open_store
from service.store.redis import RedisStore, redact
from tests.service.test_store import LAYOUT, MODEL, loaded, rows


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


def opened(
    url: str, layout: StoreLayout = LAYOUT, ttl: float = 0.0, start_over: bool = False
) -> RedisStore:
    store = open_store(url, ttl=ttl)
    assert isinstance(store, RedisStore) and store.shared
    store.open(start_over, "legacy")
    store.register(MODEL, 1, layout)
    return store


def test_rows_round_trip_exactly(redis: RedisServer) -> None:
    store = opened(redis.url)
    saved = rows(["a", "b", "ü", "tenant\x00id"], step=7, seq=2**64 - 1)
    store.save(MODEL, saved)
    got = loaded(opened(redis.url), ["zz", "ü", "a", "tenant\x00id", "b"])  # another connection
    order = [got.session_ids.index(s) for s in saved.session_ids]
    assert sorted(got.session_ids) == sorted(saved.session_ids) and got.version == 1
    np.testing.assert_array_equal(got.blob[order], saved.blob)
    assert got.step.tolist() == [7] * 4 and got.last_seq.tolist() == [2**64 - 1] * 4
    np.testing.assert_array_equal(got.updated[order], saved.updated)  # bit-exact: it is a tag
    store.delete(MODEL, ["a"])
    assert loaded(store, ["a"]).session_ids == []


def test_rows_carry_their_version_and_models_are_apart(redis: RedisServer) -> None:
    store = opened(redis.url)
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
    again = opened(redis.url)  # layouts come back from Redis
    found = {r.version: r for r in again.load(MODEL, ["a", "b", "c"])}
    assert sorted(found) == [1, 2] and found[2].blob.shape == (1, wider.width)
    assert again.versions(MODEL) == {1, 2} and again.versions("other") == {1}
    assert loaded(again, ["a"], "other").step.tolist() == [9]
    # A compare-and-set that finds the row moved to another version hands that back.
    moved = again.swap(MODEL, rows(["c"], step=2), np.ones(1, np.uint64), np.array([0.5]))
    assert moved.index.tolist() == [0] and [r.version for r in moved.current] == [2]


def test_keys_of_the_one_model_release_are_kept_as_version_1(redis: RedisServer) -> None:
    store = open_store(redis.url)
    assert isinstance(store, RedisStore)
    header = np.zeros(1, [("step", "<u8"), ("last_seq", "<u8"), ("c", "<f8"), ("u", "<f8")])
    header["step"] = 3
    blob = np.arange(LAYOUT.width, dtype="<f4").tobytes()
    store.db.set(b"lstm:s:a", header.tobytes() + blob, px=60_000)
    store.db.set(b"lstm:layout", LAYOUT.to_json())
    store.open(False, "lstm")
    (got,) = store.load("lstm", ["a"])
    assert got.version == 1 and got.step.tolist() == [3]
    np.testing.assert_array_equal(got.blob[0], np.arange(LAYOUT.width, dtype=np.float32))
    assert store.db.get(b"lstm:s:a") is None and store.db.get(b"lstm:layout") is None
    assert 0 < store.db.pttl(b"lstm:m:lstm/a") <= 60_000  # its expiry kept


def test_swap_writes_only_rows_whose_stored_version_is_the_expected_one(
    redis: RedisServer,
) -> None:
    store = opened(redis.url)
    first = rows(["new", "old", "gone"], step=1, now=100.0)
    none = store.swap(MODEL, first, np.zeros(3, np.uint64), np.zeros(3))  # step 0: no row
    assert none.index.size == 0
    second = rows(["new", "old", "gone"], step=2, now=200.0)
    second.blob += 1
    store.delete(MODEL, ["gone"])
    conflicts = store.swap(
        MODEL,
        second,
        np.array([1, 1, 1], np.uint64),
        np.array([100.0, 99.0, 100.0]),  # "old": same step, another update time
    )
    assert conflicts.index.tolist() == [1, 2]  # "gone" was expected to exist at step 1
    (current,) = conflicts.current
    assert current.session_ids == ["old"]  # the current row, absent ones left out
    np.testing.assert_array_equal(current.blob[0], first.blob[1])
    stored = loaded(store, ["new", "old", "gone"])
    assert dict(zip(stored.session_ids, stored.step.tolist())) == {"new": 2, "old": 1}


def test_every_write_sets_the_store_ttl_as_expiry(redis: RedisServer) -> None:
    store = opened(redis.url, ttl=600.0)
    store.save(MODEL, rows(["a"]))
    store.swap(MODEL, rows(["b"]), np.zeros(1, np.uint64), np.zeros(1))
    for key in (b"lstm:m:m/a", b"lstm:m:m/b"):
        assert 590_000 < store.db.pttl(key) <= 600_000
    assert store.expire(time.time()) == 0  # Redis expires them itself


def test_another_models_sessions_are_refused_unless_reset(redis: RedisServer) -> None:
    opened(redis.url).save(MODEL, rows(["a", "b"]))
    other = StoreLayout("e" * 64, ("hidden", "cell"), (3, 3), 3, 0)
    with pytest.raises(StoreMismatchError, match="--store-reset"):
        opened(redis.url, other)
    store = opened(redis.url, other, start_over=True)
    assert store.load(MODEL, ["a", "b"]) == []


def test_a_redis_that_is_down_raises_store_error_and_recovers(tmp_path: Path) -> None:
    # fsync always: with everysec a busy disk lets Redis answer a write it has not yet
    # put in the file (up to 2 s), and the kill below would lose it (seen in CI).
    redis = RedisServer(tmp_path / "redis", fsync="always").start()
    try:
        down_and_back(redis)
    finally:
        redis.stop()


def down_and_back(redis: RedisServer) -> None:
    store = opened(redis.url)
    store.save(MODEL, rows(["a"]))
    redis.kill()
    for call in (
        lambda: store.load(MODEL, ["a"]),
        lambda: store.save(MODEL, rows(["a"])),
        store.probe,
    ):
        with pytest.raises(StoreError, match=r"state store (read|write|probe) failed"):
            call()
    redis.start()  # same port, same directory: the AOF brings "a" back
    store.probe()
    assert loaded(store, ["a"]).session_ids == ["a"]


def test_the_password_never_reaches_a_log_line() -> None:
    assert redact("redis://:s3cret@db:6379/0") == "redis://:***@db:6379/0"
    assert redact("rediss://user:s3cret@db/1") == "rediss://user:***@db/1"
    assert open_store("redis://:s3cret@db:6379/0").url == "redis://:***@db:6379/0"  # type: ignore[union-attr]
