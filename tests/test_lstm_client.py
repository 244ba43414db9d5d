"""``lstm-client``, the command line, against the real server."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from service.server import Server
from tests.service.reference import Reference

CLIENT = [sys.executable, "-m", "lstm_stream.cli"]


async def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run, [*CLIENT, *args], input=stdin, capture_output=True, text=True, timeout=120
    )


async def test_ten_thousand_events_from_jsonl(server: Server, tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((10_000, 32)).astype(np.float32)
    ids = [f"dev-{i % 100}" for i in range(10_000)]
    lines = [json.dumps({"session_id": s, "values": row.tolist()}) for s, row in zip(ids, x)]
    lines[2] = json.dumps({"session_id": ids[2], "values": x[2].tolist(), "reset": True})
    source = tmp_path / "events.jsonl"
    source.write_text("\n".join(lines) + "\n")
    out = tmp_path / "results.jsonl"
    address = f"127.0.0.1:{server.port}"
    done = await run(
        "--address", address, "stream", str(source), "--output", str(out), "--progress"
    )
    assert done.returncode == 0, done.stderr
    assert "10,000 events" in done.stderr and "events/s" in done.stderr  # the rate line
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["line"] for r in records] == list(range(1, 10_001))
    ref = Reference()
    for i, record in enumerate(records):
        expected = ref.step(ids[i], x[i], reset=i == 2)
        np.testing.assert_allclose(record["output"], expected, atol=1e-5)
    assert records[-1]["step"] == 100


async def test_bad_lines_are_reported_and_the_rest_goes_on(server: Server) -> None:
    good = np.linspace(-1, 1, 32).tolist()
    lines = [
        json.dumps({"session_id": "a", "values": good}),
        "{not json",
        json.dumps({"session_id": "a", "values": good[:5]}),
        json.dumps({"session_id": "", "values": good}),
        json.dumps({"session_id": "a", "values": good}),
        json.dumps({"session_id": "b" * 200, "values": good}),  # refused by the server
    ]
    done = await run(
        "--address", f"127.0.0.1:{server.port}", "stream", "--batch", "2", stdin="\n".join(lines)
    )
    assert done.returncode == 1
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["line"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r.get("step") for r in records] == [1, None, None, None, 2, None]
    assert "not JSON" in records[1]["error"]
    assert records[2]["error"] == "5 values; the model takes 32"
    assert "session_id" in records[3]["error"]
    assert "the limit is 128" in records[5]["error"]
    for number in (2, 3, 4, 6):
        assert f"line {number}:" in done.stderr


async def test_csv_sessions_info_and_health(server: Server, tmp_path: Path) -> None:
    address = ["--address", f"127.0.0.1:{server.port}"]
    rows = ["session_id," + ",".join(f"v{i}" for i in range(32))]
    rows += ["c1," + ",".join(["0.5"] * 32), "c1," + ",".join(["0.25"] * 32)]
    source = tmp_path / "events.csv"
    source.write_text("\n".join(rows) + "\n")
    done = await run(*address, "stream", str(source))
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["step"] for line in done.stdout.splitlines()] == [1, 2]
    got = await run(*address, "get", "c1")
    assert got.returncode == 0 and json.loads(got.stdout)["step"] == 2
    reset = await run(*address, "reset", "c1")
    assert not any(json.loads(reset.stdout)["hidden"])
    assert (await run(*address, "delete", "c1")).returncode == 0
    missing = await run(*address, "get", "c1")
    assert missing.returncode == 3 and "no session 'c1'" in missing.stderr
    info = await run(*address, "info")
    assert json.loads(info.stdout)["event_size"] == 32
    health = await run(*address, "health")
    assert (health.returncode, health.stdout.strip()) == (0, "SERVING")


async def test_exit_codes_for_usage_and_an_unreachable_server() -> None:
    assert (await run("stream", "--batch", "0")).returncode == 2
    assert (await run("frobnicate")).returncode == 2
    gone = await run("--address", "127.0.0.1:1", "--retry-for", "0.5", "info")
    assert gone.returncode == 3 and "UNAVAILABLE" in gone.stderr
