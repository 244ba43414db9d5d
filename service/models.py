"""The registry: which model versions serve, as the repository and the model control say.

A version is loaded, contract-checked and warmed up off the event loop while
serving goes on, and serves only once ready; a failed load changes nothing that
serves and keeps its reason for the repository index. A failed version is tried
again when its files change (or at an explicit load); one whose files were still
changing when it failed (a copy not finished) is "not settled yet" and tried again
at the next scan instead of being reported as a failure. A version that leaves
the policy (or is unloaded) retires: its sessions follow the model's retire
policy, and the version unloads when its last session has left (load before
unload).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from service.core.engine import Engine
from service.core.lane import Lane
from service.core.model import ServedModel
from service.core.types import UnknownModel
from service.metrics import Metrics
from service.repository import (
    ConfigError,
    ModelConfig,
    RepositoryModel,
    Signature,
    newest_change_ns,
)
from service.runtime import CudaOptions, ModelContractError, Runtime, load_model_bytes
from service.state.cache import SessionCache, StoreAccess, StoreUnavailable
from service.state.table import Limits, SessionTable
from service.store.base import StoreError, StoreLayout, StoreMismatchError

log = logging.getLogger(__name__)

LOADING, READY, RETIRING, UNAVAILABLE = "LOADING", "READY", "RETIRING", "UNAVAILABLE"
CHECK_S = 0.25
"""How often a draining version looks whether its last session has left."""
STORE_CHECK_S = 30.0
"""How often a draining version asks the store whether rows are still pinned to it."""
MOVE_BATCH = 4096
"""Sessions a retiring version moves at once."""
SETTLE_S = 2.0
"""Without polling, a version not settled yet is tried again this much later (polling: at
the next scan). A model's first scan takes files changed this recently as not settled."""
MTIME_SLACK_S = 1.0
"""File times come from a coarser clock than ours (and another host's, on a network disk):
a file counts as changed after a scan when it changed up to this long before it."""


class Repository(Protocol):
    def scan(self) -> dict[str, RepositoryModel]: ...


@dataclass(frozen=True)
class LoadSettings:
    """How versions are loaded: the server's settings the registry needs."""

    device: str = "auto"
    ort_threads: int = 1
    max_batch: int = 1024
    initial_capacity: int = 1024
    cuda: CudaOptions = field(default_factory=CudaOptions)


@dataclass
class VersionStatus:
    model: str
    version: int
    state: str
    reason: str = ""


@dataclass(frozen=True)
class FailedLoad:
    """A version's last failed load: its files then, the error, and whether it was final."""

    signature: Signature
    error: str
    settled: bool
    """False: its files were still changing (a copy in progress?); tried again at the next
    scan whether or not they change again."""


class Registry:
    """The models and versions that serve; loads, retires and unloads them."""

    def __init__(
        self,
        engine: Engine,
        access: StoreAccess,
        limits: Limits,
        metrics: Metrics,
        repository: Repository,
        settings: LoadSettings,
        default_model: str,
        poll_s: float | None = None,
        log_failures: bool = True,
    ):
        self.engine = engine
        self.access = access
        self.limits = limits
        self.metrics = metrics
        self.repository = repository
        self.settings = settings
        self.default_model = default_model
        """Where requests without a model name go (see ``resolve``)."""
        self.poll_s = poll_s
        """The server rescans every ``poll_s`` seconds (None: only on SIGHUP or a load)."""
        self.settle_s = SETTLE_S if poll_s is None else poll_s
        self.log_failures = log_failures
        """False where the caller reports a failed load itself (one model file at start)."""
        self.failed: dict[tuple[str, int], FailedLoad] = {}
        self._seen: dict[tuple[str, int], Signature] = {}
        """Each version's files at the previous scan (unchanged across two: settled)."""
        self._scanned: dict[str, float] = {}
        """When each model's previous scan began (time.time())."""
        self._config_reported: dict[str, object] = {}
        self._retry: asyncio.Task[None] | None = None
        self.configs: dict[str, ModelConfig] = {}
        self.status: dict[tuple[str, int], VersionStatus] = {}
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._synced: set[str] = set()

    # -- what serves -------------------------------------------------------------------

    def resolve(self, name: str) -> ServedModel:
        """The model a request names ("": the default model); UnknownModel if none serves."""
        models = self.engine.models
        if not name:
            name = self.default_model
            if name not in models and len(models) == 1:
                name = next(iter(models))
        model = models.get(name)
        if model is None or model.closed or (model.newest is None and not model.lanes):
            raise UnknownModel(
                f"no model {name!r} is loaded"
                + (f" (loaded: {', '.join(sorted(models))})" if models else "")
            )
        return model

    def index(self) -> list[VersionStatus]:
        """Every version seen, by model and version."""
        for model in self.engine.models.values():
            newest = model.newest
            for lane in model.by_age:
                status = self.status.get((model.name, lane.version))
                if status is not None and status.state in (READY, RETIRING):
                    status.state = RETIRING if lane.retiring else READY
                    if lane.retiring:
                        status.reason = f"retiring ({lane.retiring})" + (
                            f"; version {newest.version} serves new sessions" if newest else ""
                        )
                    else:
                        status.reason = ""
        return [self.status[key] for key in sorted(self.status)]

    def _set(self, model: str, version: int, state: str, reason: str = "") -> None:
        old = self.status.get((model, version))
        if old is not None:
            with contextlib.suppress(KeyError):
                self.metrics.model_state.remove(model, str(version), old.state)
        self.status[(model, version)] = VersionStatus(model, version, state, reason)
        self.metrics.model_state.labels(model, str(version), state).set(1)

    # -- applying the repository --------------------------------------------------------

    async def sync(self, names: Iterable[str] | None = None, unload_missing: bool = False) -> None:
        """Scan the repository and apply it to ``names`` (None: every model found).

        ``unload_missing``: models no longer in the repository are unloaded (poll mode).
        """
        async with self._lock:
            scanned_at = time.time()
            try:
                found = await asyncio.to_thread(self.repository.scan)
            except (OSError, ConfigError) as exc:
                log.error("cannot read the model repository: %s", exc)
                return
            wanted = list(found) if names is None else list(names)
            for name in wanted:
                entry = found.get(name)
                if entry is None:
                    self._forget(name, set())
                    await self._unload(name, "not in the repository")
                    continue
                await self._apply(entry, scanned_at)
            if unload_missing:
                for name in [n for n in self.engine.models if n not in found]:
                    await self._unload(name, "removed from the repository")
            self._retry_unsettled()

    async def load(self, name: str) -> None:
        """Load (or reload) a model as the repository has it now (explicit control); a
        version that failed before is tried again even if its files did not change."""
        async with self._lock:
            scanned_at = time.time()
            found = await asyncio.to_thread(self.repository.scan)
            entry = found.get(name)
            if entry is None:
                raise UnknownModel(f"no model {name!r} in the repository")
            await self._apply(entry, scanned_at, again=True)
            self._retry_unsettled()
            status = [s for s in self.status.values() if s.model == name]
            if name not in self.engine.models or self.engine.models[name].newest is None:
                reasons = "; ".join(f"version {s.version}: {s.reason}" for s in status if s.reason)
                raise ModelContractError(reasons or "no version")

    def load_error(self, name: str, version: int) -> str | None:
        """Why a version's last load failed, as the runtime or the store said it (None: it
        did not fail)."""
        failed = self.failed.get((name, version))
        return failed.error if failed is not None else None

    async def unload(self, name: str) -> None:
        """Unload every version of a model (explicit control)."""
        async with self._lock:
            # A version waiting to be tried again is not, once its model is unloaded.
            for key in [k for k, f in self.failed.items() if k[0] == name and not f.settled]:
                failed = self.failed[key]
                self.failed[key] = FailedLoad(failed.signature, failed.error, True)
                self._set(name, key[1], UNAVAILABLE, "unloaded")
            if name not in self.engine.models:
                raise UnknownModel(f"no model {name!r} is loaded")
            await self._unload(name, "unloaded")

    async def _apply(self, entry: RepositoryModel, scanned_at: float, again: bool = False) -> None:
        """Bring a model's versions to what the repository (scanned at ``scanned_at``) and the
        policy say; ``again``: also try versions whose last load failed on the same files."""
        name = entry.name
        self._forget(name, set(entry.versions))
        for version, reason in entry.missing.items():
            if (name, version) not in self.status or self.status[(name, version)].state != READY:
                self._set(name, version, UNAVAILABLE, reason)
        # Files that changed since the previous scan began may still be being written: a
        # load of them that fails is not settled yet, unless two scans saw them the same.
        since = self._scanned.get(name, scanned_at - self.settle_s) - MTIME_SLACK_S
        self._scanned[name] = scanned_at
        settled = {
            v: self._seen.get((name, v)) == sig or newest_change_ns(sig) < since * 1e9
            for v, sig in entry.signatures.items()
        }
        self._seen.update({(name, v): sig for v, sig in entry.signatures.items()})
        if entry.problem is not None or entry.config is None:
            # Said once per change of the files, not at every scan.
            seen = (entry.problem, sorted(entry.signatures.items()))
            if self._config_reported.get(name) != seen:
                self._config_reported[name] = seen
                log.error("model %s cannot load: %s", name, entry.problem)
                self.metrics.load_failures.labels(name).inc()
            for version in entry.versions:
                if (name, version) not in self.status or self.status[(name, version)].state in (
                    LOADING,
                    UNAVAILABLE,
                ):
                    self._set(name, version, UNAVAILABLE, entry.problem or "no config")
            return
        self._config_reported.pop(name, None)
        config = self.configs[name] = entry.config
        wanted = config.policy.allows(list(entry.versions))
        model = self.engine.models.get(name)
        pinned: set[int] = set()
        if config.retire.policy == "drain" and self.access.persistent and name not in self._synced:
            # Sessions pinned to versions that left the policy while the server was down.
            with contextlib.suppress(StoreUnavailable):
                stored = await self.access.read(self.access.store.versions, name)
                pinned = {v for v in stored if v in entry.versions and v not in wanted}
        self._synced.add(name)
        loaded = set(model.lanes) if model is not None else set()
        for version in sorted(set(wanted) | pinned):
            if version in loaded:
                continue
            signature = entry.signatures.get(version, ())
            failed = self.failed.get((name, version))
            if (
                failed is not None
                and failed.settled
                and failed.signature == signature
                and not again
            ):
                continue  # the same files fail the same way
            lane = await self._load(
                name, version, entry.versions[version], config, signature, settled.get(version)
            )
            if lane is not None and version in pinned:
                self._retire(self.engine.models[name], lane, "drain")
        for (model_name, version), failed in list(self.failed.items()):
            if model_name == name and not failed.settled and version not in wanted:
                # It left the policy before its files settled: its last failure stands.
                self.failed[(name, version)] = FailedLoad(failed.signature, failed.error, True)
                self._set(name, version, UNAVAILABLE, f"load failed: {failed.error}")
        model = self.engine.models.get(name)
        if model is None:
            return
        model.policy = config.retire
        model.closed = False
        # Load before unload: a version leaves only when one that the policy wants serves.
        serving = [v for v in wanted if v in model.lanes]
        for version, lane in list(model.lanes.items()):
            if version in wanted:
                if lane.retiring is not None:
                    model.retire(lane, None)  # back in the policy
                    self.engine.lanes_changed()
                    self._set(name, version, READY)
            elif lane.retiring is None and serving:
                self._retire(model, lane, config.retire.policy)

    async def _load(
        self,
        name: str,
        version: int,
        path: str | None,
        config: ModelConfig,
        signature: Signature = (),
        settled: bool | None = True,
    ) -> Lane | None:
        """Load, check and warm a version up off the loop; the lane once it serves.

        ``signature``: the version's files as scanned; ``settled``: whether a failure is
        final (else the files may still be being written: tried again at the next scan).
        """
        self._set(name, version, LOADING)
        s = self.settings
        started = time.perf_counter()
        try:
            data, source = await asyncio.to_thread(load_model_bytes, path)
            runtime = await asyncio.to_thread(
                Runtime, data, source, s.device, s.ort_threads, s.cuda
            )
            await asyncio.to_thread(runtime.warm_up, s.max_batch)
            lane = await self.install(name, version, runtime, data, config)
        except (ModelContractError, StoreMismatchError, StoreError, StoreUnavailable) as exc:
            self._failed_load(name, version, str(exc), signature, bool(settled) or not signature)
            return None
        self.failed.pop((name, version), None)
        spec = runtime.spec
        log.info(
            "%s version %d ready in %.2fs: %s, provider %s, states %s",
            name,
            version,
            time.perf_counter() - started,
            spec.source,
            runtime.provider,
            ",".join(f"{n}[{k}]" for n, k in zip(spec.state_names, spec.state_sizes)),
        )
        return lane

    def _failed_load(
        self, name: str, version: int, error: str, signature: Signature, settled: bool
    ) -> None:
        """Record a failed load: final (the index says "load failed", the failure is
        counted), or not settled yet (LOADING, and why; tried again at the next scan)."""
        self.failed[(name, version)] = FailedLoad(signature, error, settled)
        if settled:
            reason = f"load failed: {error}"
            if self.log_failures:
                log.error("%s version %d: %s", name, version, reason)
            self._set(name, version, UNAVAILABLE, reason)
            self.metrics.load_failures.labels(name).inc()
            return
        path, size, mtime_ns = max(signature, key=lambda file: file[2])
        age = max(time.time() - mtime_ns / 1e9, 0.0)
        when = "at the next scan" if self.poll_s is not None else f"in {self.settle_s:g}s"
        reason = (
            f"not settled yet: {name}/{path} ({size} bytes) changed {age:.1f}s ago and the "
            f"load failed ({error}); tried again {when}"
        )
        log.warning("%s version %d: %s", name, version, reason)
        self._set(name, version, LOADING, reason)

    def _forget(self, name: str, present: set[int]) -> None:
        """Failed loads of versions no longer on disk are forgotten: one that comes back is
        tried again."""
        for key in [k for k in self.failed if k[0] == name and k[1] not in present]:
            del self.failed[key]
            status = self.status.get(key)
            if status is not None and status.state in (LOADING, UNAVAILABLE):
                self._set(name, key[1], UNAVAILABLE, "not in the repository")
        for key in [k for k in self._seen if k[0] == name and k[1] not in present]:
            del self._seen[key]
        if not present:
            self._scanned.pop(name, None)

    def _retry_unsettled(self) -> None:
        """Without polling, nothing else looks again: a version not settled yet is tried
        again ``settle_s`` later."""
        if self.poll_s is not None or self._retry is not None or not self._unsettled():
            return
        self._retry = asyncio.get_running_loop().create_task(
            self._retry_later(), name="retry-unsettled"
        )
        self._tasks.add(self._retry)
        self._retry.add_done_callback(self._tasks.discard)

    def _unsettled(self) -> list[str]:
        return sorted({name for (name, _), f in self.failed.items() if not f.settled})

    async def _retry_later(self) -> None:
        await asyncio.sleep(self.settle_s)
        self._retry = None
        names = self._unsettled()  # as they are now: an unload may have taken some away
        if names:
            await self.sync(names)

    async def install(
        self, name: str, version: int, runtime: Runtime, data: bytes, config: ModelConfig
    ) -> Lane:
        """Serve a loaded runtime as ``name`` version ``version``: check that it fits the
        model's other versions, record its row layout in the store, give it a lane."""
        spec = runtime.spec
        model = self.engine.models.get(name)
        self._check_fits(model, name, version, runtime, config)
        self.configs.setdefault(name, config)
        replay = config.retire.replay_events if config.retire.policy == "replay" else 0
        layout = StoreLayout(
            # A model without a parameter fingerprint is known by its bytes.
            spec.fingerprint or "sha256:" + hashlib.sha256(data).hexdigest(),
            spec.state_names,
            spec.state_sizes,
            spec.output_size,
            spec.output_alias,
            replay,
            spec.event_size if replay else 0,
        )
        await self.access.write(self.access.store.register, name, version, layout)
        if model is None:
            model = ServedModel(
                name, config.retire, self.access, self.metrics, self.engine.run_batch
            )
            self.engine.add_model(model)
        table = SessionTable(
            spec.state_sizes,
            spec.output_size,
            self.limits.max_sessions,
            self.settings.initial_capacity,
            output_alias=spec.output_alias,
            limits=self.limits,
            kept_events=replay,
            event_size=spec.event_size if replay else 0,
        )
        cache = SessionCache(table, layout, self.access, self.metrics, name, version, model.claims)
        lane = Lane(name, version, runtime, cache)
        model.add(lane)
        self.engine.lanes_changed()
        self._set(name, version, READY)
        self.metrics.loads.labels(name).inc()
        lane.info_labels = (
            name,
            str(version),
            spec.fingerprint[:16],
            runtime.provider,
            str(spec.event_size),
            str(spec.output_size),
            spec.source,
            runtime.device,
        )
        self.metrics.model_info.labels(*lane.info_labels).set(1)
        return lane

    @staticmethod
    def _check_fits(
        model: ServedModel | None, name: str, version: int, runtime: Runtime, config: ModelConfig
    ) -> None:
        """A version must take and give what the model's others do; under ``carry`` its state
        must be laid out as theirs too."""
        if model is None or not model.lanes:
            return
        spec = runtime.spec
        other = (model.newest or model.by_age[0]).spec
        if (spec.event_size, spec.output_size) != (other.event_size, other.output_size):
            raise ModelContractError(
                f"{name} version {version} takes {spec.event_size} values and gives "
                f"{spec.output_size}; the model's other versions take {other.event_size} and "
                f"give {other.output_size} (a new event or output size is a new model)"
            )
        states = (spec.state_names, spec.state_sizes)
        if config.retire.policy == "carry" and states != (other.state_names, other.state_sizes):
            mine = ", ".join(f"{n}[{k}]" for n, k in zip(*states))
            theirs = ", ".join(f"{n}[{k}]" for n, k in zip(other.state_names, other.state_sizes))
            raise ModelContractError(
                f"{name} version {version} has states {mine}; the serving version has "
                f"{theirs}: retire_policy carry cannot move sessions between them"
            )

    # -- retiring and unloading -------------------------------------------------------------

    def _retire(self, model: ServedModel, lane: Lane, policy: str) -> None:
        model.retire(lane, policy)
        self.engine.lanes_changed()
        self._set(model.name, lane.version, RETIRING, f"retiring ({policy})")
        log.info("%s version %d retires (%s)", model.name, lane.version, policy)
        task = asyncio.get_running_loop().create_task(
            self._retire_loop(model, lane), name=f"retire-{model.name}-{lane.version}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _retire_loop(self, model: ServedModel, lane: Lane) -> None:
        """Move or drain a retiring version's sessions, then unload it."""
        started = time.monotonic()
        stored_checked = 0.0
        while not lane.unloaded and lane.retiring is not None:
            policy = lane.retiring
            if policy == "unload":
                if not lane.busy:
                    self._drop(model, lane, "unloaded")
                    return
                await asyncio.sleep(CHECK_S)
                continue
            if policy == "drain":
                after = model.policy.after_s
                if after and time.monotonic() - started >= after:
                    log.info(
                        "%s version %d: retire_after_s %.0f passed; its sessions move by reset",
                        model.name,
                        lane.version,
                        after,
                    )
                    lane.retiring = "reset"
                    continue
                if not len(lane.table) and not lane.busy:
                    now = time.monotonic()
                    if not self.access.persistent:
                        self._drop(model, lane, "retired: its last session left")
                        return
                    if now - stored_checked >= STORE_CHECK_S:
                        stored_checked = now
                        with contextlib.suppress(StoreUnavailable):
                            held = await self.access.read(self.access.store.versions, model.name)
                            if lane.version not in held:
                                self._drop(model, lane, "retired: its last session left")
                                return
                await asyncio.sleep(CHECK_S)
                continue
            target = model.newest
            ids = lane.table.ids_of(lane.table.live_slots()[:MOVE_BATCH])
            if target is None:
                await asyncio.sleep(CHECK_S)
                continue
            if not ids:
                if not lane.busy:
                    self._drop(model, lane, "retired: its sessions moved")
                    return
                await asyncio.sleep(CHECK_S)
                continue
            try:
                await self.engine.move(model, ids, lane, target, policy)
            except StoreUnavailable:
                await asyncio.sleep(CHECK_S)
            except Exception:
                log.exception("moving sessions of %s version %d failed", model.name, lane.version)
                await asyncio.sleep(CHECK_S)

    def _drop(self, model: ServedModel, lane: Lane, reason: str) -> None:
        model.drop(lane)
        self.engine.lanes_changed()
        with contextlib.suppress(KeyError):
            self.metrics.model_info.remove(*lane.info_labels)
        self._set(model.name, lane.version, UNAVAILABLE, reason)
        self.metrics.unloads.labels(model.name).inc()
        log.info("%s version %d unloaded: %s", model.name, lane.version, reason)
        if not model.lanes:
            self.engine.remove_model(model.name)

    async def _unload(self, name: str, reason: str) -> None:
        """Every version of the model stops taking events and unloads once idle."""
        model = self.engine.models.get(name)
        if model is None:
            return
        for lane in list(model.lanes.values()):
            was_retiring = lane.retiring is not None
            model.retire(lane, "unload")
            self._set(name, lane.version, RETIRING, reason)
            if not was_retiring:
                task = asyncio.get_running_loop().create_task(self._retire_loop(model, lane))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        model.closed = True

    async def expire_stored(self, ttl: float) -> int:
        """Delete sessions idle longer than ``ttl`` seconds from the store, and from memory."""
        cutoff = time.time() - ttl
        try:
            n = await self.access.write(self.access.store.expire, cutoff)
        except StoreUnavailable:
            return 0  # tried again at the next period; the probe reports recovery
        for lane in self.engine.lanes:
            async with lane.cache.lock:
                # Write-through keeps ``updated`` equal in both places: the same sessions.
                lane.cache.evict_idle_before(cutoff)
        if n:
            self.metrics.evictions.labels("store_ttl").inc(n)
            log.info("expired %d sessions from the state store (store ttl %.0fs)", n, ttl)
        return n

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
