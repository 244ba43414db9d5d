"""deploy/prometheus and deploy/grafana, run natively: promtool, a real Prometheus, the dashboard.

Debian's ``prometheus`` package (promtool included) is installed by ``make tools``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from lstm_bench import procs
from lstm_stream.v1 import lstm_stream_pb2 as pb
from lstm_stream.v1 import lstm_stream_pb2_grpc as pb_grpc
from tests.deploy.test_compose import start_compose_server
from tests.service.client import Ev, request
from tests.service.reference import events

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
from render_dashboard import render  # noqa: E402

PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "lstm-stream.json"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run `make tools` (make test does)")
    return path


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("promtool"), *args],
        cwd=PROMETHEUS_DIR,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_promtool_checks_config_and_rules() -> None:
    for args in (
        ("check", "config", "prometheus.yml"),
        ("check", "rules", "alerts.yml"),
        ("test", "rules", "alerts_test.yml"),
    ):
        done = promtool(*args)
        assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 8 rules found" in promtool("check", "rules", "alerts.yml").stdout


def test_every_alert_has_a_unit_test() -> None:
    rules = (PROMETHEUS_DIR / "alerts.yml").read_text()
    tests = (PROMETHEUS_DIR / "alerts_test.yml").read_text()
    names = [line.split(":", 1)[1].strip() for line in rules.splitlines() if "- alert:" in line]
    assert len(names) == 8
    for name in names:
        assert f"alertname: {name}" in tests, name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[procs.Target, str]]:
    """The compose stack's parts, natively: the server as docker-compose.yml runs it, and
    Debian's Prometheus with the repo's config and rules, scraping it on loopback."""
    proc, port, metrics_port = start_compose_server(tmp_path_factory.mktemp("data"))
    target = procs.Target("server", proc, port, metrics_port)
    work = tmp_path_factory.mktemp("prometheus")
    config = (PROMETHEUS_DIR / "prometheus.yml").read_text()
    assert '["lstm-stream:9464"]' in config
    config = config.replace('["lstm-stream:9464"]', f'["127.0.0.1:{target.metrics_port}"]')
    config = re.sub(r"(?ms)^    # the scaled.*?port: 9464\n", "", config)  # no Docker DNS here
    assert "dns_sd_configs" not in config
    config = config.replace("scrape_interval: 5s", "scrape_interval: 1s")
    (work / "prometheus.yml").write_text(config)
    shutil.copy(PROMETHEUS_DIR / "alerts.yml", work / "alerts.yml")
    port = free_port()
    prometheus = subprocess.Popen(
        [
            tool("prometheus"),
            f"--config.file={work / 'prometheus.yml'}",
            f"--storage.tsdb.path={work / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(work / "prometheus.log", "w"),  # noqa: SIM115  # closed with the process
    )
    api = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{api}/-/ready", timeout=2)
                break
            except OSError:
                time.sleep(0.2)
        else:
            pytest.fail("prometheus did not become ready: " + (work / "prometheus.log").read_text())
        yield target, api
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=30)
        target.stop()


async def traffic(address: str, seconds: float) -> None:
    """Every kind of thing the dashboard shows: both forms, a stream, a delete, an error."""
    rng = np.random.default_rng(0)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.LstmStreamStub(channel)
        deadline = time.monotonic() + seconds
        k = 0
        while time.monotonic() < deadline:
            x = events(rng, 8)
            plan = [Ev(f"s{i}", x[i]) for i in range(8)]
            await stub.Step(request(plan, columnar=k % 2 == 0))
            call = stub.StreamSteps(iter([request(plan[:4]), request(plan[4:], columnar=True)]))
            [r async for r in call]
            if k % 10 == 0:
                await stub.DeleteSession(pb.SessionRef(session_id="s0"))
                with pytest.raises(grpc.aio.AioRpcError):
                    await stub.GetSession(pb.SessionRef(session_id="nobody"))
            k += 1
            await asyncio.sleep(0.02)


async def test_prometheus_scrapes_and_every_dashboard_query_has_data(
    stack: tuple[procs.Target, str],
) -> None:
    target, api = stack
    # LSTM_DASHBOARD_SECONDS/LSTM_DASHBOARD_DIR: a longer run that keeps the picture
    # (how docs/dashboard.png was made); the suite runs 8 s and throws it away.
    await traffic(target.address, float(os.environ.get("LSTM_DASHBOARD_SECONDS") or 8))
    targets = get_json(f"{api}/api/v1/targets")["data"]["activeTargets"]
    assert [(t["labels"]["job"], t["health"]) for t in targets] == [("lstm-stream", "up")]
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(exprs) >= 16
    empty = []
    for expr in exprs:
        url = f"{api}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        answer = get_json(url)
        assert answer["status"] == "success", (expr, answer)
        if not answer["data"]["result"]:
            empty.append(expr)
    assert not empty, f"dashboard queries without data: {empty}"
    # The README's picture of the dashboard, drawn from this Prometheus.
    picture = stack_dir(api) / "dashboard.png"
    assert render(api, picture, minutes=2) >= len(exprs)
    assert picture.stat().st_size > 20_000
    rules = get_json(f"{api}/api/v1/rules")["data"]["groups"]
    names = [r["name"] for r in rules[0]["rules"]]
    assert names == [
        "LstmStreamDown",
        "LstmStreamErrorRatio",
        "LstmStreamLatencyHigh",
        "LstmStreamSessionsNearCap",
        "LstmStreamStoreFailing",
        "LstmStreamStoreConflicts",
        "LstmStreamModelLoadFailed",
        "LstmStreamVersionDrainingLong",
    ]
    assert all(r["health"] == "ok" for r in rules[0]["rules"]), rules


def stack_dir(api: str) -> Path:
    return Path(os.environ.get("LSTM_DASHBOARD_DIR") or tempfile.mkdtemp())


def test_promtool_check_metrics_on_the_servers_metrics(stack: tuple[procs.Target, str]) -> None:
    target, _ = stack
    url = f"http://127.0.0.1:{target.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    done = promtool("check", "metrics", stdin=text)
    assert done.returncode == 0, done.stdout + done.stderr
