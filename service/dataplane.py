"""The data plane: the one facade every API calls — step, the session verbs, models.

APIs convert their messages to these calls and back, and raise nothing of
their own about sessions: the facade checks ids, namespaces a tenant's ids
(``state.keys``), finds the model a call names, and raises the domain errors
below, which the APIs map to status codes in one place.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from service.core.engine import Engine
from service.core.model import ServedModel
from service.core.sessions import Found, Sessions
from service.core.types import (
    CannotMove,
    Code,
    EngineClosed,
    EventBlock,
    InvalidRequest,
    Job,
    NotReady,
    UnknownModel,
)
from service.models import Registry, VersionStatus
from service.runtime import ModelSpec
from service.state.cache import StoreUnavailable
from service.state.keys import SEP as TENANT_SEP
from service.state.keys import key, keys
from service.state.table import SessionCapError, SessionSnapshot, session_id_error

__all__ = [
    "TENANT_SEP",
    "CannotMove",
    "Code",
    "DataPlane",
    "EngineClosed",
    "EventBlock",
    "Found",
    "InvalidRequest",
    "Job",
    "ModelInfo",
    "NotReady",
    "Route",
    "SessionCapError",
    "SessionSnapshot",
    "StoreUnavailable",
    "UnknownModel",
    "VersionStatus",
]


class Route(NamedTuple):
    """The model a request names, and how many values its events take."""

    model: ServedModel
    event_size: int


@dataclass(frozen=True)
class ModelInfo:
    """What ``GetModelInfo`` shows a tenant about one model version."""

    model: str
    version: int
    versions: tuple[int, ...]
    """The versions ready now."""
    spec: ModelSpec
    provider: str
    live_sessions: int
    """The caller's tenant's sessions in memory on this model (all without tenants)."""
    max_sessions: int
    retire_policy: str


class DataPlane:
    """Every API's way in. Answers NotReady until ``attach`` (the models are loaded)."""

    def __init__(self, max_session_id_bytes: int, max_sessions: int):
        self.max_session_id_bytes = max_session_id_bytes
        self.max_sessions = max_sessions
        self._engine: Engine | None = None
        self._registry: Registry | None = None
        self._closed = False
        self._routes: dict[str, Route] = {}
        self._routes_of = -1

    def attach(self, engine: Engine, registry: Registry) -> None:
        """Start answering."""
        self._engine = engine
        self._registry = registry

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
    def registry(self) -> Registry:
        if self._registry is None:
            raise NotReady("the model is still loading")
        return self._registry

    @property
    def serving(self) -> bool:
        """Attached, not draining, a model serves, and the state store takes writes."""
        engine = self._engine
        return (
            engine is not None
            and not self._closed
            and any(m.newest is not None for m in engine.models.values())
            and engine.store.health.ok
        )

    def model(self, name: str = "") -> ServedModel:
        """The model a call names ("": the default); UnknownModel when none such serves."""
        return self.registry.resolve(name)

    def route(self, name: str = "") -> Route:
        """The model a request names and its event size (every version takes as many),
        cached per name until the engine's lanes change: looked up once per request."""
        engine = self._engine
        if engine is None:
            raise NotReady("the model is still loading")
        if self._routes_of != engine.generation:
            self._routes.clear()
            self._routes_of = engine.generation
        route = self._routes.get(name)
        if route is None or route[0].closed:
            served = self.registry.resolve(name)
            lane = served.newest or served.by_age[0]
            route = self._routes[name] = Route(served, lane.spec.event_size)
        return route

    def event_size(self, name: str = "") -> int:
        """Values per event of a model."""
        return self.route(name)[1]

    def spec(self, name: str = "", version: int = 0) -> ModelSpec:
        """A model version's step contract (version 0: the newest ready one)."""
        model = self.model(name)
        lane = model.lanes.get(version) if version else (model.newest or model.by_age[0])
        if lane is None:
            raise UnknownModel(f"model {model.name!r} has no version {version}")
        return lane.spec

    # -- events --------------------------------------------------------------------

    def step(
        self,
        tenant: str,
        block: EventBlock,
        include_state: bool = False,
        model: str = "",
        version: int = 0,
        route: Route | None = None,
    ) -> Job:
        """Queue a request's events (ids as the tenant sent them); ``job.future`` answers.

        ``route``: what ``route(model)`` gave, when the caller asked already.
        """
        served = (route or self.route(model))[0]
        engine = self._engine
        assert engine is not None
        if version and version not in served.lanes:
            raise UnknownModel(f"model {served.name!r} has no version {version} loaded")
        if tenant:
            self._scope(tenant, block)
        return engine.submit(served, block, include_state, version)

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

    def _sessions(self, model: str) -> Sessions:
        return Sessions(self.engine, self.model(model))

    @staticmethod
    def _as_sent(found: Found | None, session_id: str) -> Found | None:
        if found is None:
            return None
        snap = dataclasses.replace(found.snapshot, session_id=session_id)
        return dataclasses.replace(found, snapshot=snap)

    async def get(self, tenant: str, session_id: str, model: str = "") -> Found | None:
        found = await self._sessions(model).get(self._key(tenant, session_id))
        return self._as_sent(found, session_id)

    async def has_session(self, tenant: str, session_id: str, model: str = "") -> bool:
        """Whether the session exists (an id that could not exist does not)."""
        return await self._sessions(model).has(key(tenant, session_id))

    async def put(
        self,
        tenant: str,
        session_id: str,
        step: int,
        last_seq: int,
        states: Mapping[str, Sequence[float] | np.ndarray],
        model: str = "",
        version: int = 0,
    ) -> Found:
        """Create or overwrite a session; a state left out (or empty) is zeros."""
        sid = self._key(tenant, session_id)
        if self._closed:
            raise EngineClosed("the server is draining")
        found = await self._sessions(model).put(sid, step, last_seq, states, version)
        result = self._as_sent(found, session_id)
        assert result is not None
        return result

    async def reset(self, tenant: str, session_id: str, model: str = "") -> Found | None:
        found = await self._sessions(model).reset(self._key(tenant, session_id))
        return self._as_sent(found, session_id)

    async def delete(self, tenant: str, session_id: str, model: str = "") -> Found | None:
        found = await self._sessions(model).delete(self._key(tenant, session_id))
        return self._as_sent(found, session_id)

    async def migrate(
        self, tenant: str, session_id: str, model: str, to_version: int, mode: str
    ) -> Found | None:
        sid = self._key(tenant, session_id)
        if self._closed:
            raise EngineClosed("the server is draining")
        found = await self._sessions(model).migrate(sid, to_version, mode)
        return self._as_sent(found, session_id)

    # -- models --------------------------------------------------------------------

    def info(self, tenant: str, model: str = "", version: int = 0) -> ModelInfo:
        served = self.model(model)
        lane = served.lanes.get(version) if version else (served.newest or served.by_age[0])
        if lane is None:
            raise UnknownModel(f"model {served.name!r} has no version {version}")
        return ModelInfo(
            served.name,
            lane.version,
            tuple(sorted(v for v, la in served.lanes.items() if la.retiring is None)),
            lane.spec,
            lane.runtime.provider,
            served.live_sessions(tenant),
            self.max_sessions,
            served.policy.policy,
        )

    def versions(self) -> list[VersionStatus]:
        """Every model version the server knows, with its state."""
        return self.registry.index()

    def live_sessions(self, tenant: str, model: str, version: int) -> int:
        """A version's sessions in memory (with tenants: the tenant's own)."""
        served = self.engine.models.get(model)
        lane = served.lanes.get(version) if served is not None else None
        return lane.table.tenant_count(tenant) if lane is not None else 0

    @property
    def default_model(self) -> str:
        return self.registry.default_model

    async def load_model(self, name: str) -> None:
        await self.registry.load(name)

    async def unload_model(self, name: str) -> None:
        await self.registry.unload(name)
