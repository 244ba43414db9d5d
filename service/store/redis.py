"""The Redis state store: sessions shared by every replica, each write a compare-and-set.

A session is one Redis string, ``lstm:s:<id>``: a 32-byte header (step and last_seq
as uint64, created and updated as float64, little-endian) and the float32 state blob
laid out as ``StoreLayout`` says. Replicas keep sessions in memory as a cache; a write
of events (``swap``) is one Lua script per batch that writes a row only when the
stored row is still the one the replica's copy was made from (same step and same
``updated`` bytes) and hands back the current row of every other, so a stale replica
reloads and re-applies instead of overwriting. Expiry is Redis's own (``PX``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from service.store.base import (
    Conflicts,
    StateStore,
    StoredRows,
    StoreError,
    StoreLayout,
    StoreMismatchError,
)

log = logging.getLogger(__name__)

PREFIX = b"lstm:s:"
LAYOUT_KEY = b"lstm:layout"
PROBE_KEY = b"lstm:probe"
HEADER = [("step", "<u8"), ("last_seq", "<u8"), ("created", "<f8"), ("updated", "<f8")]
TAG = np.dtype([("step", "<u8"), ("updated", "<f8")])
"""What a compare-and-set compares: a row's step and its ``updated`` bytes (16 bytes)."""

# KEYS: the sessions. ARGV: expiry in ms (0: none), the size of a row, every key's
# expected tag (16 bytes each: step and updated as the copy's source had them; step 0
# also matches no row) and every key's new row, each list as one string (four
# arguments, not two per key: packing arguments is most of the client's cost).
# Returns the 0-based index and current value ('' when absent) of every key not
# written. Runs atomically: no other command sees a half-written batch.
SWAP_LUA = """
local ttl = tonumber(ARGV[1])
local size = tonumber(ARGV[2])
local tags = ARGV[3]
local rows = ARGV[4]
local out = {}
for i = 1, #KEYS do
  local want = string.sub(tags, 16 * i - 15, 16 * i)
  local cur = redis.call('GET', KEYS[i])
  local ok
  if cur then
    ok = (string.sub(cur, 1, 8) .. string.sub(cur, 25, 32)) == want
  else
    ok = string.sub(want, 1, 8) == '\\0\\0\\0\\0\\0\\0\\0\\0'
  end
  if ok then
    local row = string.sub(rows, size * (i - 1) + 1, size * i)
    if ttl > 0 then
      redis.call('SET', KEYS[i], row, 'PX', ttl)
    else
      redis.call('SET', KEYS[i], row)
    end
  else
    out[#out + 1] = i - 1
    out[#out + 1] = cur or ''
  end
end
return out
"""


def redact(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class RedisStore(StateStore):
    """Sessions in one Redis database (``redis://HOST:PORT/DB`` or ``rediss://`` for TLS).

    Blocking calls from the store thread (so one pooled connection); every call is one
    round trip.
    """

    shared = True

    def __init__(self, url: str, timeout: float = 1.0, ttl: float = 0.0):
        import redis  # imported here: a server without Redis never loads it
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self._redis_errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self.url = redact(url)
        self.ttl_ms = int(ttl * 1000)
        self.layout: StoreLayout | None = None
        self._record: np.dtype[Any] | None = None
        # No retries inside redis-py: a write whose answer was lost must surface as a
        # failure, not be sent twice; the batcher's compare-and-set sorts out the rest.
        self.db = redis.Redis.from_url(
            url,
            socket_timeout=timeout or None,
            socket_connect_timeout=timeout or None,
            retry=Retry(NoBackoff(), 0),
        )  # connects at the first call (open), not here
        self._swap = self.db.register_script(SWAP_LUA)

    def _fail(self, what: str, exc: BaseException) -> StoreError:
        return StoreError(f"state store {what} failed ({self.url}): {exc}")

    def open(self, layout: StoreLayout, start_over: bool) -> None:
        try:
            raw = self.db.get(LAYOUT_KEY)
            stored = raw.decode() if isinstance(raw, bytes) else raw
            if stored is not None and stored != layout.to_json() and not start_over:
                raise StoreMismatchError(
                    f"state store {self.url} holds sessions of "
                    f"{StoreLayout.from_json(stored).describe()}; this server runs "
                    f"{layout.describe()}. Start with --store-reset to delete the stored "
                    "sessions and start over, or use another Redis database."
                )
            if start_over:
                deleted = 0
                for chunk in _chunks(self.db.scan_iter(match=PREFIX + b"*", count=1000), 1000):
                    deleted += int(self.db.unlink(*chunk))
                log.warning("--store-reset: deleted %d stored sessions from %s", deleted, self.url)
            self.db.set(LAYOUT_KEY, layout.to_json())
        except self._redis_errors as exc:
            raise StoreError(f"cannot open state store {self.url}: {exc}") from exc
        self.layout = layout
        self._record = np.dtype([*HEADER, ("blob", "<f4", (layout.width,))])

    @property
    def record(self) -> np.dtype[Any]:
        assert self._record is not None, "open() first"
        return self._record

    def load(self, session_ids: Sequence[str]) -> StoredRows:
        if not session_ids:
            return self._decode([], [])
        try:
            values: list[bytes | None] = self.db.mget([_key(s) for s in session_ids])  # type: ignore[assignment]
        except self._redis_errors as exc:
            raise self._fail("read", exc) from exc
        found = [(s, v) for s, v in zip(session_ids, values) if v is not None]
        return self._decode([s for s, _ in found], [v for _, v in found])

    def _decode(self, ids: list[str], values: list[bytes]) -> StoredRows:
        size = self.record.itemsize
        bad = [sid for sid, v in zip(ids, values) if len(v) != size]
        if bad:
            raise StoreError(
                f"state store read failed: session {bad[0]!r} has a state of the wrong size"
            )
        rec = np.frombuffer(b"".join(values), self.record)
        return StoredRows(
            ids,
            rec["step"].astype(np.uint64),
            rec["last_seq"].astype(np.uint64),
            rec["blob"].astype(np.float32).reshape(len(ids), self.record["blob"].shape[0]),
            rec["created"].astype(np.float64),
            rec["updated"].astype(np.float64),
        )

    def _records(self, rows: StoredRows) -> bytes:
        """The rows' values, back to back (each ``record.itemsize`` bytes)."""
        rec = np.empty(len(rows), self.record)
        rec["step"] = rows.step
        rec["last_seq"] = rows.last_seq
        rec["created"] = rows.created
        rec["updated"] = rows.updated
        rec["blob"] = rows.blob
        return rec.tobytes()

    def _encode(self, rows: StoredRows) -> list[bytes]:
        data = self._records(rows)
        size = self.record.itemsize
        return [data[i : i + size] for i in range(0, len(data), size)]

    def save(self, rows: StoredRows) -> None:
        try:
            with self.db.pipeline(transaction=True) as pipe:
                for sid, value in zip(rows.session_ids, self._encode(rows)):
                    pipe.set(_key(sid), value, px=self.ttl_ms or None)
                pipe.execute()
        except self._redis_errors as exc:
            raise self._fail("write", exc) from exc

    def swap(self, rows: StoredRows, prev_step: np.ndarray, prev_updated: np.ndarray) -> Conflicts:
        tags = np.empty(len(rows), TAG)
        tags["step"] = prev_step
        tags["updated"] = prev_updated
        args: list[int | bytes] = [self.ttl_ms, self.record.itemsize]
        args += (tags.tobytes(), self._records(rows))
        try:
            out = self._swap(keys=[_key(s) for s in rows.session_ids], args=args)
        except self._redis_errors as exc:
            raise self._fail("write", exc) from exc
        index = np.array(out[0::2], np.int64)
        current = [(rows.session_ids[i], v) for i, v in zip(index.tolist(), out[1::2]) if v]
        return Conflicts(index, self._decode([s for s, _ in current], [v for _, v in current]))

    def delete(self, session_ids: Sequence[str]) -> None:
        if not session_ids:
            return
        try:
            self.db.delete(*[_key(s) for s in session_ids])
        except self._redis_errors as exc:
            raise self._fail("delete", exc) from exc

    def expire(self, older_than: float) -> int:
        return 0  # every write sets the key's expiry: Redis removes idle sessions itself

    def probe(self) -> None:
        try:
            self.db.set(PROBE_KEY, json.dumps(time.time()))
        except self._redis_errors as exc:
            raise self._fail("probe", exc) from exc

    def close(self) -> None:
        self.db.close()


def _key(session_id: str) -> bytes:
    return PREFIX + session_id.encode("utf-8", "surrogatepass")


def _chunks(items: Any, n: int) -> Any:
    chunk: list[bytes] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
