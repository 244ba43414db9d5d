"""The Redis state store on its own, against Debian's redis-server: round trips, the
compare-and-set, model checks, expiry, failures."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from lstm_bench.cluster import RedisServer
from service.store import StoreError, StoreLayout, StoreMismatchError, open_store
from service.store.redis import RedisStore, redact
from tests.service.test_store import LAYOUT, rows


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


def opened(url: str, layout: StoreLayout = LAYOUT, ttl: float = 0.0) -> RedisStore:
    store = open_store(url, ttl=ttl)
    assert isinstance(store, RedisStore) and store.shared
    store.open(layout, start_over=False)
    return store


def test_rows_round_trip_exactly(redis: RedisServer) -> None:
    store = opened(redis.url)
    saved = rows(["a", "b", "ü", "tenant\x00id"], step=7, seq=2**64 - 1)
    store.save(saved)
    got = opened(redis.url).load(["zz", "ü", "a", "tenant\x00id", "b"])  # another connection
    order = [got.session_ids.index(s) for s in saved.session_ids]
    assert sorted(got.session_ids) == sorted(saved.session_ids)
    np.testing.assert_array_equal(got.blob[order], saved.blob)
    assert got.step.tolist() == [7] * 4 and got.last_seq.tolist() == [2**64 - 1] * 4
    np.testing.assert_array_equal(got.updated[order], saved.updated)  # bit-exact: it is a tag
    store.delete(["a"])
    assert store.load(["a"]).session_ids == []


def test_swap_writes_only_rows_whose_stored_version_is_the_expected_one(
    redis: RedisServer,
) -> None:
    store = opened(redis.url)
    first = rows(["new", "old", "gone"], step=1, now=100.0)
    none = store.swap(first, np.zeros(3, np.uint64), np.zeros(3))  # step 0: no row expected
    assert none.index.size == 0
    second = rows(["new", "old", "gone"], step=2, now=200.0)
    second.blob += 1
    store.delete(["gone"])
    conflicts = store.swap(
        second,
        np.array([1, 1, 1], np.uint64),
        np.array([100.0, 99.0, 100.0]),  # "old": same step, another update time
    )
    assert conflicts.index.tolist() == [1, 2]  # "gone" was expected to exist at step 1
    assert conflicts.current.session_ids == ["old"]  # the current row, absent ones left out
    np.testing.assert_array_equal(conflicts.current.blob[0], first.blob[1])
    stored = store.load(["new", "old", "gone"])
    assert dict(zip(stored.session_ids, stored.step.tolist())) == {"new": 2, "old": 1}


def test_every_write_sets_the_store_ttl_as_expiry(redis: RedisServer) -> None:
    store = opened(redis.url, ttl=600.0)
    store.save(rows(["a"]))
    store.swap(rows(["b"]), np.zeros(1, np.uint64), np.zeros(1))
    for key in (b"lstm:s:a", b"lstm:s:b"):
        assert 590_000 < store.db.pttl(key) <= 600_000
    assert store.expire(time.time()) == 0  # Redis expires them itself


def test_another_models_sessions_are_refused_unless_reset(redis: RedisServer) -> None:
    opened(redis.url).save(rows(["a", "b"]))
    other = StoreLayout("e" * 64, ("hidden", "cell"), (3, 3), 3, 0)
    with pytest.raises(StoreMismatchError, match="--store-reset"):
        opened(redis.url, other)
    store = open_store(redis.url)
    assert store is not None
    store.open(other, start_over=True)
    assert store.load(["a", "b"]).session_ids == []


def test_a_redis_that_is_down_raises_store_error_and_recovers(redis: RedisServer) -> None:
    store = opened(redis.url)
    store.save(rows(["a"]))
    redis.kill()
    for call in (lambda: store.load(["a"]), lambda: store.save(rows(["a"])), store.probe):
        with pytest.raises(StoreError, match=r"state store (read|write|probe) failed"):
            call()
    redis.start()  # same port, same directory: the AOF brings "a" back
    store.probe()
    assert store.load(["a"]).session_ids == ["a"]


def test_the_password_never_reaches_a_log_line() -> None:
    assert redact("redis://:s3cret@db:6379/0") == "redis://:***@db:6379/0"
    assert redact("rediss://user:s3cret@db/1") == "rediss://user:***@db/1"
    assert open_store("redis://:s3cret@db:6379/0").url == "redis://:***@db:6379/0"  # type: ignore[union-attr]
