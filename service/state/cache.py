"""The session cache: one model version's table in memory, written through to the state store.

The store is the truth and the table a cache of it: every change (a run, Put,
Reset, Delete) is stored first, in the store's writer thread; sessions that are
only in the store are read on demand in its reader thread, so a slow read holds
up nobody but the sessions it reads. With the null store (``--state-store
memory``) every store step is skipped and the table is all there is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, TypeVar

import numpy as np

from service.metrics import Metrics
from service.state.table import SessionSnapshot, SessionTable
from service.store.base import Conflicts, StateStore, StoredRows, StoreError, StoreLayout
from service.worker import Worker

log = logging.getLogger(__name__)

T = TypeVar("T")

PROBE_INTERVAL_S = 0.5
"""While the store is failing, it is probed this often; events fail fast meanwhile."""


class StoreUnavailable(Exception):
    """The state store is failing; the operation changed nothing."""


class StoreHealth:
    """Whether the store takes writes. The server watches it; nothing calls the server."""

    def __init__(self) -> None:
        self.failure: str | None = None
        """Why the store is failing, or None while it works."""
        self._changed = asyncio.Event()

    @property
    def ok(self) -> bool:
        return self.failure is None

    def set(self, failure: str | None) -> None:
        if (failure is None) != (self.failure is None):
            self._changed.set()
        self.failure = failure

    async def changes(self) -> AsyncIterator[bool]:
        """Yields ``ok`` each time it flips (the current value first)."""
        while True:
            self._changed.clear()
            yield self.ok
            await self._changed.wait()


class StoreAccess:
    """The store behind its two threads (writes, reads), with its health and metrics.

    A call that fails marks the store failing: later calls raise StoreUnavailable
    at once while a probe retries every PROBE_INTERVAL_S until a write succeeds.
    """

    def __init__(self, store: StateStore, metrics: Metrics):
        self.store = store
        self.metrics = metrics
        self.health = StoreHealth()
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._writer = Worker(loop, "state-store")
        self._reader = Worker(loop, "state-store-reads")
        self._probe: asyncio.Task[None] | None = None

    @property
    def persistent(self) -> bool:
        return self.store.persistent

    @property
    def shared(self) -> bool:
        return self.store.shared

    async def write(self, call: Callable[..., T], *args: Any) -> T:
        """A store call in the writer thread; StoreUnavailable if it fails (or is failing)."""
        return await self._call(self._writer, call, args)

    async def read(self, call: Callable[..., T], *args: Any) -> T:
        """A store call in the reader thread (sessions not in memory)."""
        return await self._call(self._reader, call, args)

    async def _call(self, worker: Worker, call: Callable[..., T], args: tuple[Any, ...]) -> T:
        if self.health.failure is not None:
            raise StoreUnavailable(self.health.failure)
        started = time.perf_counter()
        try:
            result = await worker.call(call, *args)
        except StoreError as exc:
            self._failed(str(exc))
            raise StoreUnavailable(str(exc)) from exc
        self.metrics.store_seconds.labels(call.__name__).observe(time.perf_counter() - started)
        return result

    def _failed(self, reason: str) -> None:
        self.metrics.store_errors.inc()
        if self.health.failure is not None:
            return
        log.error("%s; answering UNAVAILABLE and reporting NOT_SERVING until it recovers", reason)
        self.health.set(reason)
        self.metrics.store_up.set(0)
        self._probe = self._loop.create_task(self._probe_store(), name="store-probe")

    async def _probe_store(self) -> None:
        """Try a small write every PROBE_INTERVAL_S until the store takes it again."""
        while True:
            await asyncio.sleep(PROBE_INTERVAL_S)
            try:
                await self._writer.call(self.store.probe)
            except StoreError as exc:
                log.debug("state store still failing: %s", exc)
                continue
            log.info("state store recovered")
            self.health.set(None)
            self.metrics.store_up.set(1)
            return

    async def stop(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
        self._writer.stop()
        self._reader.stop()


class Claims:
    """Sessions of one model being read from the store, changed there, or moved between
    versions: one holder at a time per session."""

    def __init__(self) -> None:
        self._held: dict[str, asyncio.Future[None]] = {}

    def held(self, session_id: str) -> bool:
        return session_id in self._held

    @contextlib.asynccontextmanager
    async def claim(self, session_ids: Sequence[str]) -> AsyncIterator[None]:
        """Hold these sessions (waiting for any other holder) while reading or changing them."""
        while busy := {f for sid in session_ids if (f := self._held.get(sid)) is not None}:
            await asyncio.wait(busy)
        mine: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._held.update(dict.fromkeys(session_ids, mine))
        try:
            yield
        finally:
            for sid in session_ids:
                del self._held[sid]
            mine.set_result(None)


class SessionCache:
    """One model version's sessions: the table, the store behind it, the session verbs.

    ``lock`` admits one writer of the table at a time: a run (between gathering
    its rows and scattering them back) or a session operation. A session not in
    the table is *claimed* (``claims``, shared by the model's versions) while it
    is read from the store or changed there; lock after claim, never before.
    """

    def __init__(
        self,
        table: SessionTable,
        layout: StoreLayout,
        store: StoreAccess,
        metrics: Metrics,
        model: str = "",
        version: int = 1,
        claims: Claims | None = None,
    ):
        self.table = table
        self.layout = layout
        self.store = store
        self.metrics = metrics
        self.model = model
        self.version = version
        self.claims = claims if claims is not None else Claims()
        self.lock = asyncio.Lock()

    @property
    def persistent(self) -> bool:
        """Sessions outlive the process: ids not in the table must be looked up."""
        return self.store.persistent

    @property
    def failure(self) -> str | None:
        return self.store.health.failure

    # -- sessions not in memory ----------------------------------------------------

    async def load(self, session_ids: Sequence[str]) -> list[StoredRows]:
        """The stored rows of ids not in memory (claimed by the caller), by version."""
        found = await self.store.read(self.store.store.load, self.model, session_ids)
        n = sum(len(rows) for rows in found)
        self.metrics.store_reads.labels("missed").inc(len(session_ids) - n)
        return found

    def restore(self, rows: StoredRows, layout: StoreLayout | None = None) -> int:
        """Fill the rows just created for stored sessions; how many (refused ids have none)."""
        n = self.table.restore(
            self.table.lookup(rows.session_ids), rows, layout if layout is not None else self.layout
        )
        self.metrics.store_reads.labels("restored").inc(n)
        return n

    # -- a run's rows --------------------------------------------------------------

    async def commit(
        self,
        slots: np.ndarray,
        step: np.ndarray,
        last_seq: np.ndarray,
        states: Sequence[np.ndarray],
        output: np.ndarray,
        now: float,
        kept: np.ndarray | None = None,
    ) -> Conflicts | None:
        """Store a run's new rows in one transaction before they are applied.

        Raises StoreUnavailable when that fails. With a shared store, returns the
        rows another replica had written first (indices into ``slots``). Rows
        deleted while their events were pending are not written back. ``kept``:
        the rows' kept events with this run's (``SessionTable.kept_after``).
        """
        if not self.persistent:
            return None
        table = self.table
        keep = table.doomed_mask(slots)
        if keep is not None:
            keep = ~keep
            slots, step, last_seq = slots[keep], step[keep], last_seq[keep]
            states, output = [s[keep] for s in states], output[keep]
            kept = None if kept is None else kept[keep]
        rows = StoredRows(
            table.ids_of(slots),
            step,
            last_seq,
            self.layout.join(states, output, kept),
            table.created_at(slots),
            np.full(slots.size, now),
            self.version,
        )
        store = self.store
        if not store.shared:
            await store.write(store.store.save, self.model, rows)
            self.metrics.store_rows_written.inc(len(rows))
            return None
        prev_step, prev_updated = table.version_tags(slots)
        conflicts = await store.write(store.store.swap, self.model, rows, prev_step, prev_updated)
        if not conflicts.index.size:
            self.metrics.store_rows_written.inc(len(rows))
            return None
        self.metrics.store_rows_written.inc(len(rows) - conflicts.index.size)
        self.metrics.store_conflicts.inc(conflicts.index.size)
        if keep is not None:
            conflicts.index = np.flatnonzero(keep)[conflicts.index]
        return conflicts

    def reload(self, slots: np.ndarray, conflicts: Conflicts) -> list[str]:
        """Replace stale rows by the stored ones; a row no longer stored starts from zeros.

        Returns the ids whose stored row is now pinned to another version (another
        replica moved them): their rows here are left for the caller to drop.
        """
        table = self.table
        gone = slots
        moved: list[str] = []
        for current in conflicts.current:
            found = table.lookup(current.session_ids)
            if current.version == self.version:
                table.restore(found, current, self.layout)
            else:
                moved += current.session_ids
            gone = np.setdiff1d(gone, found)
        for slot in gone.tolist():  # deleted or expired by another replica
            table.start_over(slot)
        return moved

    # -- session operations on rows in memory ------------------------------------------

    def snapshot(self, session_id: str) -> SessionSnapshot | None:
        slot = self.table.index.get(session_id)
        return None if slot is None else self.table.snapshot(slot)

    def snapshot_of(self, rows: StoredRows, layout: StoreLayout | None = None) -> SessionSnapshot:
        """The first of ``rows`` (stored, laid out as ``layout``) as a snapshot."""
        states, output = (layout or self.layout).split(rows.blob[:1])
        return SessionSnapshot(
            session_id=rows.session_ids[0],
            step=int(rows.step[0]),
            last_seq=int(rows.last_seq[0]),
            states=tuple(s[0].copy() for s in states),
            output=output[0].copy(),
            created=float(rows.created[0]),
            updated=float(rows.updated[0]),
        )

    def row_of(
        self,
        session_id: str,
        step: int,
        last_seq: int,
        states: Sequence[np.ndarray | None],
        created: float,
        now: float,
    ) -> StoredRows:
        """A stored row of this version for PutSession (zero output, nothing kept)."""
        full = [
            np.zeros((1, n), np.float32) if v is None else np.reshape(v, (1, n))
            for v, n in zip(states, self.table.state_sizes)
        ]
        output = np.zeros((1, self.table.output_size), np.float32)
        blob = self.layout.join(full, output)
        return StoredRows.one(session_id, step, last_seq, blob, created, now, self.version)

    async def put(
        self,
        slot: int | None,
        session_id: str,
        step: int,
        last_seq: int,
        states: Sequence[np.ndarray | None],
        created: float | None,
    ) -> SessionSnapshot:
        """Write a session (``lock`` held; ``slot`` its row, or None: only in the store or new).

        Stored first. A session only in the store stays there; a new one without a
        store gets a row (within the caps).
        """
        table = self.table
        now = time.time()
        if not self.persistent:
            if slot is None:
                slot = table.create(session_id, now)
            table.write(slot, step, last_seq, states, now)
            return table.snapshot(slot)
        if slot is not None:
            created = float(table.created_at(np.array([slot]))[0])
        rows = self.row_of(session_id, step, last_seq, states, created or now, now)
        await self.store.write(self.store.store.save, self.model, rows)
        if slot is not None:
            table.write(slot, step, last_seq, states, now)
        return self.snapshot_of(rows)

    async def reset(self, slot: int) -> SessionSnapshot:
        """Zero a session's state in memory and in the store (``lock`` held); counters kept."""
        table = self.table
        now = time.time()
        if self.persistent:
            rows = table.stored_rows(np.array([slot]), self.layout, self.version)
            rows.blob = np.zeros_like(rows.blob)
            rows.updated = np.array([now])
            await self.store.write(self.store.store.save, self.model, rows)
        table.reset(slot, now)
        return table.snapshot(slot)

    async def delete(self, session_id: str) -> SessionSnapshot | None:
        """Drop a session in memory (``lock`` held) and from the store; its last state."""
        table = self.table
        slot = table.index.get(session_id)
        snap = None if slot is None else table.snapshot(slot)
        if self.persistent:
            await self.store.write(self.store.store.delete, self.model, [session_id])
        if slot is not None:
            table.remove(session_id)
        return snap

    async def evict_idle(self, ttl: float) -> int:
        """Drop sessions idle longer than ``ttl`` seconds from memory (none with pending events).

        Without a store that is the end of them; with one, they are restored when used again.
        """
        async with self.lock:
            n = self.evict_idle_before(time.time() - ttl)
        if n:
            self.metrics.evictions.labels("ttl").inc(n)
            log.info(
                "evicted %d idle sessions of %s version %d from memory (ttl %.0fs)",
                n,
                self.model,
                self.version,
                ttl,
            )
        return n

    def evict_idle_before(self, cutoff: float) -> int:
        ids = self.table.idle_ids(cutoff)
        for sid in ids:
            self.table.remove(sid)
        return len(ids)
