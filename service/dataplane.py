"""The data plane: the one facade every API calls — step, the session verbs, model info.

APIs convert their messages to these calls and back, and raise nothing of
their own about sessions: the facade checks ids and states, namespaces a
tenant's ids (``state.keys``), and raises the domain errors below, which the
APIs map to status codes in one place.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from service.core.engine import Engine
from service.core.types import (
    Code,
    EngineClosed,
    EventBlock,
    Job,
    NotReady,
)
from service.runtime import ModelSpec
from service.state.cache import SessionCache, StoreUnavailable
from service.state.keys import SEP as TENANT_SEP
from service.state.keys import key, keys
from service.state.table import SessionCapError, SessionSnapshot, session_id_error

__all__ = [
    "TENANT_SEP",
    "Code",
    "DataPlane",
    "EngineClosed",
    "EventBlock",
    "InvalidRequest",
    "Job",
    "ModelInfo",
    "NotReady",
    "SessionCapError",
    "SessionSnapshot",
    "StoreUnavailable",
]


class InvalidRequest(ValueError):
    """The call's arguments are wrong (INVALID_ARGUMENT); nothing was changed."""


@dataclass(frozen=True)
class ModelInfo:
    """What ``GetModelInfo`` shows a tenant."""

    spec: ModelSpec
    provider: str
    live_sessions: int
    """The caller's tenant's sessions in memory (all of them without tenants)."""
    max_sessions: int


class DataPlane:
    """Every API's way in. Answers NotReady until ``attach`` (the model is loaded)."""

    def __init__(self, max_session_id_bytes: int, max_sessions: int):
        self.max_session_id_bytes = max_session_id_bytes
        self.max_sessions = max_sessions
        self._engine: Engine | None = None
        self._spec: ModelSpec | None = None
        self._closed = False

    def attach(self, engine: Engine) -> None:
        """Start answering: the model is loaded and warmed up."""
        self._spec = engine.lane.runtime.spec
        self._engine = engine

    def close(self) -> None:
        """Take no new events or session writes (the server is draining)."""
        self._closed = True
        if self._engine is not None:
            self._engine.close()

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise NotReady("the model is still loading")
        return self._engine

    @property
    def _cache(self) -> SessionCache:
        return self.engine.lane.cache

    @property
    def spec(self) -> ModelSpec:
        if self._spec is None:
            raise NotReady("the model is still loading")
        return self._spec

    @property
    def serving(self) -> bool:
        """Loaded, not draining, and the state store takes writes."""
        return self._engine is not None and not self._closed and self._cache.failure is None

    # -- events --------------------------------------------------------------------

    def step(self, tenant: str, block: EventBlock, include_state: bool = False) -> Job:
        """Queue a request's events (ids as the tenant sent them); ``job.future`` answers."""
        engine = self._engine
        if engine is None:
            raise NotReady("the model is still loading")
        if tenant:
            self._scope(tenant, block)
        return engine.submit(block, include_state)

    def _scope(self, tenant: str, block: EventBlock) -> None:
        """Namespace the block's ids; ids refused as sent are marked bad here."""
        ids = block.session_ids
        lengths = list(map(len, ids))
        limit = self.max_session_id_bytes
        if lengths and (min(lengths) == 0 or 4 * max(lengths) > limit):
            bad = block.bad if block.bad is not None else {}
            for i, sid in enumerate(ids):
                problem = session_id_error(sid, limit)
                if problem is not None and i not in bad:
                    bad[i] = problem
            block.bad = bad or None
        block.session_ids = keys(tenant, ids)

    # -- sessions ------------------------------------------------------------------

    def _key(self, tenant: str, session_id: str) -> str:
        problem = session_id_error(session_id, self.max_session_id_bytes)
        if problem is not None:
            raise InvalidRequest(problem)
        return key(tenant, session_id)

    @staticmethod
    def _as_sent(snap: SessionSnapshot | None, session_id: str) -> SessionSnapshot | None:
        return None if snap is None else dataclasses.replace(snap, session_id=session_id)

    async def get(self, tenant: str, session_id: str) -> SessionSnapshot | None:
        snap = await self._cache.get(self._key(tenant, session_id))
        return self._as_sent(snap, session_id)

    async def has_session(self, tenant: str, session_id: str) -> bool:
        """Whether the session exists (an id that could not exist does not)."""
        return await self._cache.has(key(tenant, session_id))

    async def put(
        self,
        tenant: str,
        session_id: str,
        step: int,
        last_seq: int,
        states: Mapping[str, Sequence[float] | np.ndarray],
    ) -> SessionSnapshot:
        """Create or overwrite a session; a state left out (or empty) is zeros."""
        sid = self._key(tenant, session_id)
        spec = self.spec
        unknown = [name for name in states if name not in spec.state_names]
        if unknown:
            layout = ", ".join(f"{n}[{k}]" for n, k in zip(spec.state_names, spec.state_sizes))
            raise InvalidRequest(f"the model has no state {unknown[0]!r}; its states are {layout}")
        rows: list[np.ndarray | None] = [None] * len(spec.state_names)
        for i, (name, size) in enumerate(zip(spec.state_names, spec.state_sizes)):
            values = states.get(name)
            if values is None or not len(values):
                continue
            array = np.asarray(values, np.float32).reshape(-1)
            if array.size != size:
                raise InvalidRequest(
                    f"{name} has {array.size} values; the model's {name} has {size}"
                )
            if not np.isfinite(array).all():
                raise InvalidRequest(f"{name} contains NaN or Inf")
            rows[i] = array
        if self._closed:
            raise EngineClosed("the server is draining")
        snap = await self._cache.put(sid, step, last_seq, rows)
        return dataclasses.replace(snap, session_id=session_id)

    async def reset(self, tenant: str, session_id: str) -> SessionSnapshot | None:
        snap = await self._cache.reset(self._key(tenant, session_id))
        return self._as_sent(snap, session_id)

    async def delete(self, tenant: str, session_id: str) -> SessionSnapshot | None:
        snap = await self._cache.delete(self._key(tenant, session_id))
        return self._as_sent(snap, session_id)

    def info(self, tenant: str) -> ModelInfo:
        lane = self.engine.lane
        return ModelInfo(
            lane.runtime.spec,
            lane.runtime.provider,
            lane.cache.table.tenant_count(tenant),
            self.max_sessions,
        )
