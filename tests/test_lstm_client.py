"""``lstm-client``, the command line, against the real server."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lstm_stream.cli import main
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


async def test_unreachable_one_shot_command_says_it_retries_and_gives_up_in_5s() -> None:
    started = time.monotonic()
    gone = await run("--address", "127.0.0.1:1", "info")
    elapsed = time.monotonic() - started
    assert gone.returncode == 3
    lines = gone.stderr.splitlines()
    assert lines[0].startswith("lstm-client: cannot reach 127.0.0.1:1 (UNAVAILABLE")
    assert lines[0].endswith("; retrying for up to 5s (--retry-for)")
    assert lines[-1].startswith("lstm-client: UNAVAILABLE: ")
    assert 4.5 < elapsed < 20, elapsed  # the one-shot default, not stream's 30 s


async def test_unreachable_stream_retries_for_30s_and_says_so() -> None:
    # Killed once the notice is out: only the announced default is checked, not the wait.
    proc = await asyncio.create_subprocess_exec(
        *CLIENT,
        "stream",
        "--address",
        "127.0.0.1:1",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        line = await asyncio.wait_for(proc.stderr.readline(), timeout=20)
    finally:
        proc.kill()
        await proc.wait()
    assert line.decode().startswith("lstm-client: cannot reach 127.0.0.1:1 (UNAVAILABLE")
    assert line.decode().rstrip().endswith("retrying for up to 30s (--retry-for)")


async def test_unreachable_health_is_an_error_line_after_retrying() -> None:
    gone = await run("health", "--address", "127.0.0.1:1", "--retry-for", "0.5")
    assert gone.returncode == 3 and gone.stdout == ""
    lines = gone.stderr.splitlines()
    assert lines[0].startswith("lstm-client: cannot reach 127.0.0.1:1")
    assert lines[0].endswith("retrying for up to 0.5s (--retry-for)")
    assert lines[-1].startswith("lstm-client: UNAVAILABLE: ")


async def test_error_lines_are_prefixed_and_locally_refused_lines_keep_their_session(
    server: Server,
) -> None:
    address = f"127.0.0.1:{server.port}"
    missing = await run("get", "nobody", "--address", address)  # options after the command
    assert missing.returncode == 3
    assert missing.stderr.strip() == "lstm-client: no session 'nobody'"
    good = [0.5] * 32
    lines = [
        json.dumps({"session_id": "a", "values": good[:3]}),  # refused here
        "{not json",  # refused here, no session to name
        json.dumps({"session_id": "b", "values": good, "reset": "yes"}),  # refused here
        json.dumps({"session_id": "c" * 200, "values": good}),  # refused by the server
        json.dumps({"session_id": "a", "values": good}),
    ]
    done = await run("--address", address, "stream", stdin="\n".join(lines))
    assert done.returncode == 1
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r.get("session_id") for r in records] == ["a", None, "b", "c" * 200, "a"]
    assert "session_id" not in records[1]
    assert [("error" in r) for r in records] == [True, True, True, True, False]
    assert all(line.startswith("lstm-client: line ") for line in done.stderr.splitlines())
    assert len(done.stderr.splitlines()) == 4


async def test_info_prints_zero_fields_and_options_go_after_the_command(server: Server) -> None:
    address = f"127.0.0.1:{server.port}"
    # Given before and after the command, the one after wins.
    info = await run("--address", "127.0.0.1:1", "info", "--address", address)
    assert info.returncode == 0, info.stderr
    record = json.loads(info.stdout)
    assert record["live_sessions"] == 0  # protobuf leaves zeros out; the client must not
    assert record["event_size"] == 32 and record["state_names"] == ["hidden", "cell"]
    health = await run("health", "--address", address, "--retry-for", "1")
    assert (health.returncode, health.stdout.strip()) == (0, "SERVING")


def test_every_help_shows_the_defaults_and_the_csv_header_rule(
    capsys: pytest.CaptureFixture[str],
) -> None:
    texts = {}
    for command in ("", "stream", "get", "reset", "delete", "info", "health"):
        with pytest.raises(SystemExit) as exited:
            main([command, "--help"] if command else ["--help"])
        assert exited.value.code == 0
        texts[command] = " ".join(capsys.readouterr().out.split())
    address = "--address ADDRESS the server's HOST:PORT (default: 127.0.0.1:50051)"
    for command, text in texts.items():
        assert address in text, command
        assert "(default: 30 for stream, 5 for the others)" in text, command
    for default in ("(default: 256)", "(default: auto)", "(default: -)"):
        assert default in texts["stream"]
    header = "first line is skipped as a header when its second field is not a number"
    assert header in texts[""] and header in texts["stream"]
