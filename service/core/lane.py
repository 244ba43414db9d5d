"""A lane: one loaded model version — its runtime, its sessions, its pending events."""

from __future__ import annotations

import asyncio
import math

from service.core.pool import Pool
from service.metrics import LaneMetrics
from service.runtime import ModelSpec, Runtime
from service.state.cache import SessionCache
from service.state.table import SessionTable
from service.store.base import StoreLayout


class Lane:
    """One model version the engine runs. Its table holds the sessions pinned to it."""

    def __init__(
        self,
        model: str,
        version: int,
        runtime: Runtime,
        cache: SessionCache,
        metrics: LaneMetrics | None = None,
    ):
        self.model = model
        self.version = version
        self.runtime = runtime
        self.cache = cache
        self.table: SessionTable = cache.table
        self.spec: ModelSpec = runtime.spec
        self.metrics = metrics if metrics is not None else cache.metrics.lane(model, version)
        self.pool = Pool(runtime.spec.event_size)
        self.persistent = cache.persistent
        """Its sessions are written to a state store (each run's commit is awaited)."""
        self.retiring: str | None = None
        """None while new sessions may start here; else the retire policy its sessions follow."""
        self.unloaded = False
        self.info_labels: tuple[str, ...] = ()
        """This version's ``lstm_model_info`` labels (removed when it unloads)."""
        self._ran = asyncio.Event()
        self._watched = False

    def __repr__(self) -> str:
        return f"Lane({self.model!r}, {self.version})"

    @property
    def layout(self) -> StoreLayout:
        return self.cache.layout

    @property
    def busy(self) -> bool:
        """Events are pending here."""
        return bool(len(self.pool)) or self.table.busy(self.table.live_slots())

    @property
    def oldest(self) -> float:
        """When its oldest pending event arrived (infinity when none is pending)."""
        t0 = self.pool.t0
        return float(t0[0]) if t0.size else math.inf

    def after_run(self) -> None:
        """Wake whoever waits for this lane's rows to settle."""
        if self._watched:
            self._watched = False
            ran, self._ran = self._ran, asyncio.Event()
            ran.set()

    async def settled(self, session_ids: list[str]) -> None:
        """Wait until none of these sessions has an event pending here."""
        table = self.table
        while True:
            slots = table.lookup(session_ids)
            slots = slots[slots >= 0]
            if not slots.size or not table.busy(slots):
                return
            self._watched = True
            await self._ran.wait()
