"""/metrics over HTTP: every metric moves as traffic flows."""

from __future__ import annotations

import asyncio
import contextlib
import urllib.request

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.parser import text_string_to_metric_families

from lstm_stream.v1 import lstm_stream_pb2 as pb
from lstm_stream.v1 import lstm_stream_pb2_grpc as pb_grpc
from service.metrics import LATENCY_BUCKETS, BulkHistogram, CounterCells, HistogramCells
from service.server import Server
from tests.conftest import ServerFactory
from tests.service.client import Ev, request
from tests.service.reference import events


async def scrape(server: Server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_move_with_traffic(start_server: ServerFactory) -> None:
    server = await start_server(session_ttl=0.3, max_sessions=40)
    before = await scrape(server)
    assert value(before, "lstm_live_sessions") == 0
    info = [k for k in before if k[0] == "lstm_model_info"]
    assert len(info) == 1 and value(before, "lstm_model_info", **dict(info[0][1])) == 1
    assert dict(info[0][1])["event_size"] == "32"
    assert dict(info[0][1])["model"] == "lstm" and dict(info[0][1])["version"] == "1"
    assert value(before, "lstm_model_version_state", model="lstm", version="1", state="READY")
    assert value(before, "lstm_model_loads_total", model="lstm") == 1

    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.LstmStreamStub(channel)
        x = events(np.random.default_rng(0), 40)
        await stub.Step(request([Ev(f"s{i}", x[i], seq=1) for i in range(40)], columnar=True))
        await stub.Step(request([Ev("s0", x[0], seq=1), Ev("s1", x[1][:3]), Ev("new", x[2])]))
        gate = asyncio.Event()

        async def requests():
            yield request([Ev("s3", x[3])])
            await gate.wait()

        call = stub.StreamSteps(requests())
        await call.read()
        during = await scrape(server)
        gate.set()
        assert await call.read() is grpc.aio.EOF
        await stub.DeleteSession(pb.SessionRef(session_id="s5"))
        with_sessions = await scrape(server)
        await asyncio.sleep(1.0)  # past the TTL: everything idle is evicted
        after = await scrape(server)

    assert value(during, "lstm_active_streams") == 1
    assert value(after, "lstm_active_streams") == 0
    assert value(with_sessions, "lstm_live_sessions") == 39
    assert value(with_sessions, "lstm_model_live_sessions", model="lstm", version="1") == 39
    assert value(after, "lstm_live_sessions") == 0
    assert value(after, "lstm_events_total", outcome="applied") == 41
    assert value(after, "lstm_events_total", outcome="duplicate") == 1
    assert value(after, "lstm_events_total", outcome="invalid") == 1
    assert value(after, "lstm_events_total", outcome="over_capacity") == 1
    assert value(after, "lstm_evictions_total", reason="deleted") == 1
    assert value(after, "lstm_evictions_total", reason="ttl") == 39
    assert value(after, "lstm_rpcs_total", api="native", method="Step", code="OK") == 2
    assert value(after, "lstm_rpcs_total", api="native", method="StreamSteps", code="OK") == 1
    assert value(after, "lstm_rpcs_total", api="native", method="DeleteSession", code="OK") == 1
    assert value(after, "lstm_rpc_duration_seconds_count", api="native", method="Step") == 2
    assert value(after, "lstm_rpc_duration_seconds_count", api="native", method="StreamSteps") == 1
    # 42 events reached a run: 41 applied and 1 duplicate; queue wait is for applied ones.
    assert value(after, "lstm_event_latency_seconds_count") == 42
    assert value(after, "lstm_event_latency_seconds_sum") > 0
    assert value(after, "lstm_queue_wait_seconds_count") == 41
    lane = {"model": "lstm", "version": "1"}
    assert value(after, "lstm_model_events_total", **lane, outcome="applied") == 41
    assert value(after, "lstm_model_events_total", **lane, outcome="duplicate") == 1
    assert value(after, "lstm_batch_size_sum", **lane) == 41
    assert value(after, "lstm_batch_size_count", **lane) == 2  # a duplicate-only run skips ONNX
    assert value(after, "lstm_inference_duration_seconds_count", **lane) == value(
        after, "lstm_batch_size_count", **lane
    )
    assert value(before, "lstm_event_latency_seconds_count") == 0
    assert value(before, "lstm_batch_size_count", **lane) == 0


async def test_failed_rpcs_are_counted_by_code(
    server: Server, stub: pb_grpc.LstmStreamStub
) -> None:
    with contextlib.suppress(grpc.aio.AioRpcError):
        await stub.GetSession(pb.SessionRef(session_id="nobody"))
    samples = await scrape(server)
    labels = {"api": "native", "method": "GetSession", "code": "NOT_FOUND"}
    assert value(samples, "lstm_rpcs_total", **labels) == 1


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.lists(st.floats(0, 3.0) | st.sampled_from(LATENCY_BUCKETS), min_size=0, max_size=20),
        max_size=4,
    )
)
def test_bulk_histogram_counts_as_prometheus_does(batches: list[list[float]]) -> None:
    """Small batches (placed one by one) and large ones (numpy) land in the buckets and sum
    that prometheus-client's own Histogram gives for the same values, bounds included."""
    registry = CollectorRegistry()
    bulk = BulkHistogram("bulk_seconds", "bulk", LATENCY_BUCKETS)
    registry.register(bulk)
    plain = Histogram("plain_seconds", "plain", buckets=LATENCY_BUCKETS, registry=registry)
    for batch in batches:
        bulk.observe_since(0.0, -np.array(batch, np.float64))  # from -v to 0: exactly v
        for v in batch:
            plain.observe(v)
    for suffix in ("_count", "_sum"):
        got = registry.get_sample_value("bulk_seconds" + suffix)
        want = registry.get_sample_value("plain_seconds" + suffix)
        assert got == pytest.approx(want)
    for bound in LATENCY_BUCKETS:
        le = {"le": repr(float(bound))}
        assert registry.get_sample_value("bulk_seconds_bucket", le) == registry.get_sample_value(
            "plain_seconds_bucket", le
        )


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0, 3.0) | st.sampled_from(LATENCY_BUCKETS), max_size=30))
def test_histogram_and_counter_cells_read_as_prometheus_objects_do(values: list[float]) -> None:
    """The call-free cells a run updates expose what prometheus-client's own objects would."""
    registry = CollectorRegistry()
    cells = HistogramCells("cells_seconds", "cells", ["model"], LATENCY_BUCKETS)
    counts = CounterCells("cells_events", "cells", ["model"])
    registry.register(cells)
    registry.register(counts)
    plain = Histogram(
        "plain_seconds", "plain", ["model"], buckets=LATENCY_BUCKETS, registry=registry
    )
    plain_counts = Counter("plain_events", "plain", ["model"], registry=registry)
    cell, count = cells.cell("m"), counts.cell("m")
    plain_cell, plain_count = plain.labels("m"), plain_counts.labels("m")
    for v in values:
        cell.observe(v)
        plain_cell.observe(v)
        count.value += v
        plain_count.inc(v)
    m = {"model": "m"}
    for suffix in ("_count", "_sum"):
        got = registry.get_sample_value("cells_seconds" + suffix, m)
        assert got == pytest.approx(registry.get_sample_value("plain_seconds" + suffix, m))
    for bound in (*LATENCY_BUCKETS, float("inf")):
        le = {**m, "le": "+Inf" if bound == float("inf") else repr(float(bound))}
        got = registry.get_sample_value("cells_seconds_bucket", le)
        assert got == registry.get_sample_value("plain_seconds_bucket", le)
    got = registry.get_sample_value("cells_events_total", m)
    assert got == pytest.approx(registry.get_sample_value("plain_events_total", m))
