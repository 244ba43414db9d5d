"""The Redis state store: sessions shared by every replica, each write a compare-and-set.

A session is one Redis string, ``lstm:m:<model>/<key>``: a 40-byte header (step and
last_seq as uint64, created and updated as float64, the model version as int64,
little-endian) and the float32 state blob laid out as the version's ``StoreLayout``
says (every version's layout in the hash ``lstm:layouts``). Replicas keep sessions in
memory as a cache; a write of events (``swap``) is one Lua script per batch that
writes a row only when the stored row is still the one the replica's copy was made
from (same step and same ``updated`` bytes) and hands back the current row of every
other, so a stale replica reloads and re-applies instead of overwriting. Expiry is
Redis's own (``PX``).
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
    mismatch,
)

log = logging.getLogger(__name__)

PREFIX = b"lstm:m:"
LAYOUTS_KEY = b"lstm:layouts"
PROBE_KEY = b"lstm:probe"
LEGACY_PREFIX = b"lstm:s:"
LEGACY_LAYOUT_KEY = b"lstm:layout"
"""The one-model release's keys: adopted as version 1 of the default model at open."""
HEADER = [
    ("step", "<u8"),
    ("last_seq", "<u8"),
    ("created", "<f8"),
    ("updated", "<f8"),
    ("version", "<i8"),
]
LEGACY_HEADER_BYTES = 32
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

    Blocking calls from the store's threads (redis-py pools a connection per thread);
    every call is one round trip, but for ``open`` and the scans of ``versions``.
    """

    shared = True

    def __init__(self, url: str, timeout: float = 1.0, ttl: float = 0.0):
        import redis  # imported here: a server without Redis never loads it
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self._redis_errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self.url = redact(url)
        self.ttl_ms = int(ttl * 1000)
        self._layouts: dict[tuple[str, int], StoreLayout] = {}
        # No retries inside redis-py: a write whose answer was lost must surface as a
        # failure, not be sent twice; the compare-and-set sorts out the rest.
        self.db = redis.Redis.from_url(
            url,
            socket_timeout=timeout or None,
            socket_connect_timeout=timeout or None,
            retry=Retry(NoBackoff(), 0),
        )  # connects at the first call (open), not here
        self._swap = self.db.register_script(SWAP_LUA)

    def _fail(self, what: str, exc: BaseException) -> StoreError:
        return StoreError(f"state store {what} failed ({self.url}): {exc}")

    def open(self, start_over: bool, legacy_model: str) -> None:
        try:
            self._adopt_legacy(legacy_model)
            if start_over:
                deleted = 0
                for chunk in _chunks(self.db.scan_iter(match=PREFIX + b"*", count=1000), 1000):
                    deleted += int(self.db.unlink(*chunk))
                self.db.delete(LAYOUTS_KEY)
                log.warning("--store-reset: deleted %d stored sessions from %s", deleted, self.url)
            found: dict[bytes, bytes] = self.db.hgetall(LAYOUTS_KEY)  # type: ignore[assignment]
        except self._redis_errors as exc:
            raise StoreError(f"cannot open state store {self.url}: {exc}") from exc
        self._layouts = {}
        for field, value in found.items():
            model, _, version = field.decode().rpartition("/")
            self._layouts[(model, int(version))] = StoreLayout.from_json(value.decode())

    def _adopt_legacy(self, legacy_model: str) -> None:
        """Keys of the one-model release become version 1 of ``legacy_model``."""
        layout = self.db.get(LEGACY_LAYOUT_KEY)
        if layout is None:
            return
        moved = 0
        version = np.array([1], "<i8").tobytes()
        chunk: list[bytes]
        for chunk in _chunks(self.db.scan_iter(match=LEGACY_PREFIX + b"*", count=1000), 1000):
            values = self.db.mget(chunk)
            ttls = self.db.pipeline(transaction=False)
            for key in chunk:
                ttls.pttl(key)
            expiries = ttls.execute()
            with self.db.pipeline(transaction=True) as pipe:
                for key, value, ttl in zip(chunk, values, expiries):  # type: ignore[arg-type]
                    if value is None:
                        continue
                    new = PREFIX + legacy_model.encode() + b"/" + key[len(LEGACY_PREFIX) :]
                    raw = bytes(value)  # type: ignore[arg-type]
                    row = raw[:LEGACY_HEADER_BYTES] + version + raw[LEGACY_HEADER_BYTES:]
                    pipe.set(new, row, px=ttl if ttl and ttl > 0 else None)
                    pipe.delete(key)
                    moved += 1
                pipe.execute()
        field = f"{legacy_model}/1"
        self.db.hset(LAYOUTS_KEY, field, layout)
        self.db.delete(LEGACY_LAYOUT_KEY)
        log.info(
            "state store %s: %d sessions of the one-model format kept as %r version 1",
            self.url,
            moved,
            legacy_model,
        )

    def register(self, model: str, version: int, layout: StoreLayout) -> None:
        stored = self._layouts.get((model, version))
        if stored == layout:
            return
        try:
            if stored is not None and version in self.versions(model):
                raise StoreMismatchError(mismatch(self.url, model, version, stored, layout))
            self.db.hset(LAYOUTS_KEY, f"{model}/{version}", layout.to_json())
        except self._redis_errors as exc:
            raise self._fail("write", exc) from exc
        self._layouts[(model, version)] = layout

    def layouts(self, model: str) -> dict[int, StoreLayout]:
        return {v: layout for (m, v), layout in self._layouts.items() if m == model}

    def versions(self, model: str) -> set[int]:
        """A scan of the model's keys (their version bytes only): O(sessions)."""
        found: set[int] = set()
        header = LEGACY_HEADER_BYTES
        try:
            pattern = _prefix(model) + b"*"
            for chunk in _chunks(self.db.scan_iter(match=pattern, count=1000), 1000):
                pipe = self.db.pipeline(transaction=False)
                for key in chunk:
                    pipe.getrange(key, header, header + 7)
                for raw in pipe.execute():
                    if raw and len(raw) == 8:
                        found.add(int(np.frombuffer(raw, "<i8")[0]))
        except self._redis_errors as exc:
            raise self._fail("read", exc) from exc
        return found

    def _record(self, model: str, version: int) -> np.dtype[Any]:
        layout = self._layouts.get((model, version))
        if layout is None:
            raise StoreError(
                f"state store read failed: sessions of {model!r} version {version} have no "
                "recorded layout"
            )
        return np.dtype([*HEADER, ("blob", "<f4", (layout.width,))])

    def load(self, model: str, session_ids: Sequence[str]) -> list[StoredRows]:
        if not session_ids:
            return []
        try:
            values: list[bytes | None] = self.db.mget([_key(model, s) for s in session_ids])  # type: ignore[assignment]
        except self._redis_errors as exc:
            raise self._fail("read", exc) from exc
        found = [(s, v) for s, v in zip(session_ids, values) if v is not None]
        return self._decode(model, [s for s, _ in found], [v for _, v in found])

    def _decode(self, model: str, ids: list[str], values: list[bytes]) -> list[StoredRows]:
        """Rows grouped by the version in their header."""
        by_version: dict[int, list[int]] = {}
        for i, value in enumerate(values):
            version = int(np.frombuffer(value[32:40], "<i8")[0]) if len(value) >= 40 else -1
            by_version.setdefault(version, []).append(i)
        out = []
        for version, at in by_version.items():
            record = self._record(model, version) if version >= 0 else None
            bad = [ids[i] for i in at if record is None or len(values[i]) != record.itemsize]
            if bad or record is None:
                raise StoreError(
                    f"state store read failed: session {bad[0]!r} has a state of the wrong size"
                )
            rec = np.frombuffer(b"".join(values[i] for i in at), record)
            out.append(
                StoredRows(
                    [ids[i] for i in at],
                    rec["step"].astype(np.uint64),
                    rec["last_seq"].astype(np.uint64),
                    rec["blob"].astype(np.float32).reshape(len(at), record["blob"].shape[0]),
                    rec["created"].astype(np.float64),
                    rec["updated"].astype(np.float64),
                    version,
                )
            )
        return out

    def _records(self, model: str, rows: StoredRows) -> tuple[bytes, int]:
        """The rows' values, back to back, and the size of one."""
        record = self._record(model, rows.version)
        rec = np.empty(len(rows), record)
        rec["step"] = rows.step
        rec["last_seq"] = rows.last_seq
        rec["created"] = rows.created
        rec["updated"] = rows.updated
        rec["version"] = rows.version
        rec["blob"] = rows.blob
        return rec.tobytes(), record.itemsize

    def save(self, model: str, rows: StoredRows) -> None:
        data, size = self._records(model, rows)
        try:
            with self.db.pipeline(transaction=True) as pipe:
                for i, sid in enumerate(rows.session_ids):
                    row = data[i * size : (i + 1) * size]
                    pipe.set(_key(model, sid), row, px=self.ttl_ms or None)
                pipe.execute()
        except self._redis_errors as exc:
            raise self._fail("write", exc) from exc

    def swap(
        self, model: str, rows: StoredRows, prev_step: np.ndarray, prev_updated: np.ndarray
    ) -> Conflicts:
        tags = np.empty(len(rows), TAG)
        tags["step"] = prev_step
        tags["updated"] = prev_updated
        data, size = self._records(model, rows)
        args: list[int | bytes] = [self.ttl_ms, size, tags.tobytes(), data]
        try:
            out = self._swap(keys=[_key(model, s) for s in rows.session_ids], args=args)
        except self._redis_errors as exc:
            raise self._fail("write", exc) from exc
        index = np.array(out[0::2], np.int64)
        current = [(rows.session_ids[i], v) for i, v in zip(index.tolist(), out[1::2]) if v]
        found = self._decode(model, [s for s, _ in current], [v for _, v in current])
        return Conflicts(index, found)

    def delete(self, model: str, session_ids: Sequence[str]) -> None:
        if not session_ids:
            return
        try:
            self.db.delete(*[_key(model, s) for s in session_ids])
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


def _prefix(model: str) -> bytes:
    return PREFIX + model.encode() + b"/"


def _key(model: str, session_id: str) -> bytes:
    return _prefix(model) + session_id.encode("utf-8", "surrogatepass")


def _chunks(items: Any, n: int) -> Any:
    chunk: list[bytes] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
