"""Prometheus metrics on an injected registry; per-event figures are recorded in bulk."""

from __future__ import annotations

import asyncio
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from itertools import accumulate

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from service.counts import add_elapsed

LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)

OUTCOMES = ("applied", "duplicate", "invalid", "over_capacity", "failed", "unavailable")
"""Event outcomes: the bounded values of the ``outcome`` label."""


class BulkHistogram(Collector):
    """A histogram fed whole numpy arrays at once: one ``observe_since`` per batch of events."""

    def __init__(self, name: str, documentation: str, buckets: Sequence[float]):
        self._name = name
        self._doc = documentation
        self._bounds = np.asarray(buckets, np.float64)
        self._counts = np.zeros(len(buckets) + 1, np.int64)
        self._sum = 0.0

    def observe_since(self, now: float, starts: np.ndarray) -> None:
        """Count the seconds from each of ``starts`` (float64) to ``now`` in their buckets:
        one compiled pass, no array of differences."""
        self._sum += add_elapsed(self._counts, self._bounds, now, starts)

    def collect(self) -> Iterable[HistogramMetricFamily]:
        # The event loop is the only writer; a scrape sees each count or the one before.
        cumulative = np.cumsum(self._counts).tolist()
        total = self._sum
        buckets = [(_le(b), c) for b, c in zip(self._bounds.tolist(), cumulative)]
        buckets.append(("+Inf", cumulative[-1]))
        family = HistogramMetricFamily(self._name, self._doc)
        family.add_metric([], buckets, total)
        yield family


class Cell:
    """One labelled counter's value, incremented with ``+=``: no call, no lock.

    Only the event loop writes these; a scrape (another thread) reads each value
    or the one just before it, never a torn one.
    """

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0


class CounterCells(Collector):
    """A counter family of ``Cell``s, for counts bumped on every run."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()):
        self._name = name
        self._doc = documentation
        self._labelnames = tuple(labelnames)
        self._cells: dict[tuple[str, ...], Cell] = {}
        if not self._labelnames:
            self.cell()

    def cell(self, *labels: str) -> Cell:
        """The cell of these label values (made once, then the same one)."""
        cell = self._cells.get(labels)
        if cell is None:
            cell = self._cells[labels] = Cell()
        return cell

    def collect(self) -> list[CounterMetricFamily]:
        family = CounterMetricFamily(self._name, self._doc, labels=self._labelnames)
        for labels, cell in list(self._cells.items()):
            family.add_metric(labels, cell.value)
        return [family]


class HistogramCell:
    """One labelled histogram: ``observe`` is one call and a bisect."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: list[float]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # "le" buckets: a value equal to a bound belongs to that bound's bucket.
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


class HistogramCells(Collector):
    """A histogram family of ``HistogramCell``s, for figures observed on every run."""

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float]
    ):
        self._name = name
        self._doc = documentation
        self._labelnames = tuple(labelnames)
        self._bounds = [float(b) for b in buckets]
        self._cells: dict[tuple[str, ...], HistogramCell] = {}

    def cell(self, *labels: str) -> HistogramCell:
        cell = self._cells.get(labels)
        if cell is None:
            cell = self._cells[labels] = HistogramCell(self._bounds)
        return cell

    def collect(self) -> list[HistogramMetricFamily]:
        family = HistogramMetricFamily(self._name, self._doc, labels=self._labelnames)
        for labels, cell in list(self._cells.items()):
            cumulative = list(accumulate(cell.counts))
            buckets = [(_le(b), c) for b, c in zip(self._bounds, cumulative)]
            buckets.append(("+Inf", cumulative[-1]))
            family.add_metric(labels, buckets, cell.sum)
        return [family]


class _LiveSessions(Collector):
    """``lstm_live_sessions``: the server's total, and ``lstm_model_live_sessions`` per version."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def collect(self) -> Iterable[GaugeMetricFamily]:
        counts = self.metrics._live()
        total = GaugeMetricFamily("lstm_live_sessions", "Sessions in memory.")
        total.add_metric([], sum(n for _, _, n in counts))
        yield total
        per = GaugeMetricFamily(
            "lstm_model_live_sessions",
            "Sessions in memory, by the model version they are pinned to.",
            labels=["model", "version"],
        )
        for model, version, n in counts:
            per.add_metric([model, version], n)
        yield per


class LaneMetrics:
    """One model version's metrics, bound once (not per run)."""

    def __init__(self, metrics: Metrics, model: str, version: str):
        self.batch_size = metrics.batch_size.cell(model, version)
        self.inference_seconds = metrics.inference_seconds.cell(model, version)
        self.applied = metrics.model_events.cell(model, version, "applied")
        self.duplicate = metrics.model_events.cell(model, version, "duplicate")


def _le(bound: float) -> str:
    return repr(float(bound))


class Metrics:
    """Every metric of the server, prefix ``lstm_``; labels never carry a session id."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.events = CounterCells("lstm_events", "Events answered, by outcome.", ["outcome"])
        r.register(self.events)
        self._event_counters = {o: self.events.cell(o) for o in OUTCOMES}
        self._applied = self._event_counters["applied"]
        self._duplicate = self._event_counters["duplicate"]
        self.rpcs = Counter(
            "lstm_rpcs",
            "RPCs finished, by API (native, oip), method and gRPC status code.",
            ["api", "method", "code"],
            registry=r,
        )
        self.rpc_seconds = Histogram(
            "lstm_rpc_duration_seconds",
            "Time to answer one call (for streams: the whole stream).",
            ["api", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.event_seconds = BulkHistogram(
            "lstm_event_latency_seconds",
            "From a request's arrival to its event being applied.",
            LATENCY_BUCKETS,
        )
        self.queue_seconds = BulkHistogram(
            "lstm_queue_wait_seconds",
            "From a request's arrival to the start of its event's run.",
            LATENCY_BUCKETS,
        )
        r.register(self.event_seconds)
        r.register(self.queue_seconds)
        # Observed on every run: cells, not prometheus_client's objects (docs/PERFORMANCE.md).
        self.batch_size = HistogramCells(
            "lstm_batch_size",
            "Events per ONNX Runtime run, by model version.",
            ["model", "version"],
            BATCH_BUCKETS,
        )
        self.inference_seconds = HistogramCells(
            "lstm_inference_duration_seconds",
            "Time of one ONNX Runtime run, by model version.",
            ["model", "version"],
            LATENCY_BUCKETS,
        )
        self.model_events = CounterCells(
            "lstm_model_events",
            "Events a model version ran (applied) or answered as duplicates (duplicate).",
            ["model", "version", "outcome"],
        )
        self.inference_cpu = CounterCells(
            "lstm_inference_cpu_seconds",
            "CPU time ONNX Runtime spent in runs (its thread; a small run on the event loop: "
            "the run's time).",
        )
        self._inference_cpu = self.inference_cpu.cell()
        for family in (self.batch_size, self.inference_seconds, self.model_events):
            r.register(family)
        r.register(self.inference_cpu)
        self._live: Callable[[], list[tuple[str, str, int]]] = list
        r.register(_LiveSessions(self))
        self.max_sessions = Gauge(
            "lstm_max_sessions", "The cap on sessions in memory (--max-sessions).", registry=r
        )
        self.evictions = Counter(
            "lstm_evictions", "Sessions evicted, by reason.", ["reason"], registry=r
        )
        self.active_streams = Gauge("lstm_active_streams", "Open StreamSteps calls.", registry=r)
        self.loop_tasks = Gauge(
            "lstm_event_loop_tasks",
            "Unfinished asyncio tasks on the server's event loop (a leak shows here).",
            registry=r,
        )
        ProcessCollector(registry=r)  # process_cpu_seconds_total, RSS, open fds
        self.store_up = Gauge(
            "lstm_store_up",
            "1 while the state store takes writes (always 1 for memory), 0 while it fails.",
            registry=r,
        )
        self.store_up.set(1)
        self.store_errors = Counter(
            "lstm_store_errors", "State store operations that failed.", registry=r
        )
        self.store_seconds = Histogram(
            "lstm_store_duration_seconds",
            "Time of one state store operation (save: one run's group commit).",
            ["op"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.store_rows_written = Counter(
            "lstm_store_rows_written", "Session rows committed to the state store.", registry=r
        )
        self.store_reads = Counter(
            "lstm_store_reads",
            "Sessions looked up in the state store: restored (found) or missed (new).",
            ["result"],
            registry=r,
        )
        self.store_conflicts = Counter(
            "lstm_store_conflicts",
            "Event writes refused by a shared store because another replica had written the "
            "session first; the session was reloaded and the event applied again.",
            registry=r,
        )
        self.model_info = Gauge(
            "lstm_model_info",
            "A loaded model version (value 1); provider and device (cpu, cuda:N): where it runs.",
            [
                "model",
                "version",
                "fingerprint",
                "provider",
                "event_size",
                "output_size",
                "source",
                "device",
            ],
            registry=r,
        )
        self.model_state = Gauge(
            "lstm_model_version_state",
            "Each model version's state (value 1): LOADING, READY, RETIRING, UNAVAILABLE.",
            ["model", "version", "state"],
            registry=r,
        )
        self.loads = Counter(
            "lstm_model_loads", "Model versions loaded and ready.", ["model"], registry=r
        )
        self.load_failures = Counter(
            "lstm_model_load_failures",
            "Model versions (or configs) that failed to load; the index says why.",
            ["model"],
            registry=r,
        )
        self.unloads = Counter(
            "lstm_model_unloads", "Model versions unloaded.", ["model"], registry=r
        )
        self.migrations = Counter(
            "lstm_migrations",
            "Sessions moved to another model version, by how (carry, reset, replay).",
            ["model", "policy"],
            registry=r,
        )

    def count_events(self, outcome: str, n: int) -> None:
        if n:
            self._event_counters[outcome].value += n

    def count_run(
        self,
        lane: LaneMetrics,
        ran: int,
        duplicate: int,
        failed: str | None,
        seconds: float,
        cpu: float,
    ) -> None:
        """One run's counts: its events by outcome (``failed``: the outcome of its ``ran``
        events when the run failed), its size, time and ONNX Runtime's CPU time."""
        if failed is None:
            self._applied.value += ran
            lane.applied.value += ran
        elif ran:
            self._event_counters[failed].value += ran
        if duplicate:
            self._duplicate.value += duplicate
            lane.duplicate.value += duplicate
        if seconds >= 0:  # < 0: no run happened (every event a duplicate, or refused)
            sizes, times = lane.batch_size, lane.inference_seconds  # observe(), inlined:
            sizes.counts[bisect_left(sizes.bounds, ran)] += 1
            sizes.sum += ran
            times.counts[bisect_left(times.bounds, seconds)] += 1
            times.sum += seconds
            self._inference_cpu.value += cpu

    def track_live_sessions(self, count: Callable[[], list[tuple[str, str, int]]]) -> None:
        """``count()``: (model, version, sessions in memory) of every loaded version."""
        self._live = count

    def lane(self, model: str, version: int) -> LaneMetrics:
        return LaneMetrics(self, model, str(version))

    def track_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        # all_tasks is safe to call from the scrape thread: it copies the set, retrying.
        self.loop_tasks.set_function(lambda: len(asyncio.all_tasks(loop)))
