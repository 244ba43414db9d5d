"""``lstm-client``, the command line, against the real server."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lstm_stream.cli import main
from service.server import Server
from tests.conftest import ServerFactory
from tests.service.reference import Reference

DIES_WITH_PARENT = (
    "import ctypes, runpy, signal; "
    "ctypes.CDLL(None).prctl(1, signal.SIGKILL); "  # 1: PR_SET_PDEATHSIG
    "runpy.run_module('lstm_stream.cli', run_name='__main__')"
)
CLIENT = [sys.executable, "-c", DIES_WITH_PARENT]
"""``lstm-client``, killed by the kernel if the test process dies. Set in the child itself:
a ``preexec_fn`` would fork this process, gRPC's threads and all."""


async def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [*CLIENT, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


async def start_client(*args: str, **streams: int) -> asyncio.subprocess.Process:
    """``lstm-client ARGS`` running, its pipes (stdin, stdout, stderr) ours unless given."""
    pipes = {name: asyncio.subprocess.PIPE for name in ("stdin", "stdout", "stderr")}
    return await asyncio.create_subprocess_exec(*CLIENT, *args, **{**pipes, **streams})


def jsonl(*records: dict[str, object]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


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
    assert gone.returncode == 3
    assert (
        gone.stderr.splitlines()[-1] == "lstm-client: cannot reach 127.0.0.1:1 (connection refused)"
    )


@pytest.mark.parametrize("command", ["stream", "info", "health"])
@pytest.mark.parametrize(
    ("address", "reason"),
    [("127.0.0.1:1", "connection refused"), ("lstm.invalid:50051", "name does not resolve")],
)
async def test_a_wrong_address_fails_fast_in_words(command: str, address: str, reason: str) -> None:
    # .invalid never resolves (RFC 6761) and is refused without a lookup: loopback only.
    started = time.monotonic()
    gone = await run("--address", address, command, stdin="")
    elapsed = time.monotonic() - started
    assert gone.returncode == 3 and gone.stdout == ""
    assert gone.stderr == f"lstm-client: cannot reach {address} ({reason})\n"
    assert elapsed < 4.5, elapsed  # not --retry-for's 30 s (stream) or 5 s


async def test_a_server_that_takes_the_connection_and_never_answers_fails_fast() -> None:
    with socket.socket() as silent:  # the kernel accepts; nothing speaks HTTP/2
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        gone = await run("--address", address, "info")
        elapsed = time.monotonic() - started
    assert gone.returncode == 3
    assert gone.stderr == f"lstm-client: cannot reach {address} (timed out)\n"
    assert elapsed < 4.5, elapsed  # gRPC alone would wait 20 s for the handshake


async def test_an_address_without_a_port_is_a_usage_error() -> None:
    done = await run("--address", "127.0.0.1", "info")
    assert done.returncode == 2
    assert done.stderr == (
        "lstm-client: address '127.0.0.1' has no port: give HOST:PORT "
        "(lstm-serve listens on 50051)\n"
    )
    ipv6 = await run("--address", "::1", "info")
    assert ipv6.returncode == 2 and "[ADDRESS]:PORT" in ipv6.stderr


async def test_a_server_never_reached_is_waited_for_as_long_as_retry_for_says() -> None:
    started = time.monotonic()
    gone = await run("--address", "127.0.0.1:1", "--retry-for", "3", "info")
    elapsed = time.monotonic() - started
    assert gone.returncode == 3
    assert gone.stderr.splitlines() == [
        "lstm-client: cannot reach 127.0.0.1:1 (connection refused); retrying for up to 3s "
        "(--retry-for)",
        "lstm-client: cannot reach 127.0.0.1:1 (connection refused)",
    ]
    assert 2.5 < elapsed < 20, elapsed


async def test_stream_rides_out_a_server_that_goes_away_and_comes_back(
    start_server: ServerFactory,
) -> None:
    """Reached once, the server is then down for longer than the 2 s connect timeout: the
    stream says it retries for --retry-for's default 30 s and goes on when it is back."""
    first = await start_server()
    port = first.port
    proc = await start_client("--address", f"127.0.0.1:{port}", "stream", "--batch", "1")
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    x = [[0.1 * k] * 32 for k in range(6)]
    try:
        for k in range(3):
            proc.stdin.write(jsonl({"session_id": "away", "values": x[k]}).encode())
            await proc.stdin.drain()
            answer = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
            assert answer["step"] == k + 1
        await first.stop(grace=0.5)
        proc.stdin.write(jsonl({"session_id": "away", "values": x[3]}).encode())
        await proc.stdin.drain()
        notice = (await asyncio.wait_for(proc.stderr.readline(), 30)).decode()
        await asyncio.sleep(3)  # longer than the connect timeout
        await start_server(port=port)
        proc.stdin.write(jsonl(*({"session_id": "away", "values": v} for v in x[4:])).encode())
        proc.stdin.close()
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    assert notice.startswith(f"lstm-client: cannot reach 127.0.0.1:{port} (")
    assert notice.rstrip().endswith("retrying for up to 30s (--retry-for)")
    records = [json.loads(line) for line in out.decode().splitlines()]
    assert [r["line"] for r in records] == [4, 5, 6] and all("step" in r for r in records)
    # The new server (no store) starts the session afresh: three events, once each.
    assert [r["step"] for r in records] == [1, 2, 3]


async def test_unreachable_health_is_an_error_line_after_retrying() -> None:
    gone = await run("health", "--address", "127.0.0.1:1", "--retry-for", "0.5")
    assert gone.returncode == 3 and gone.stdout == ""
    lines = gone.stderr.splitlines()
    assert lines[0].startswith("lstm-client: cannot reach 127.0.0.1:1")
    assert lines[0].endswith("retrying for up to 0.5s (--retry-for)")
    assert lines[-1] == "lstm-client: cannot reach 127.0.0.1:1 (connection refused)"


async def test_seq_in_jsonl_is_sent_and_a_duplicate_is_not_applied_again(server: Server) -> None:
    """Explicit and automatic seqs in one session: an explicit seq is used as it is, an
    automatic one follows the highest so far, a seq at or below the last comes back
    duplicate; the state is that of the events applied once each."""
    x = np.random.default_rng(7).standard_normal((6, 32)).astype(np.float32).tolist()
    lines = jsonl(
        {"session_id": "q", "values": x[0], "seq": 5},
        {"session_id": "q", "values": x[1], "seq": 5},  # same request: a duplicate
        {"session_id": "q", "values": x[2], "seq": 7},
        {"session_id": "q", "values": x[3]},  # numbered 8 by the client
        {"session_id": "q", "values": x[4], "seq": 8},  # another request: a duplicate
        {"session_id": "q", "values": x[5], "reset": True},  # 9, from zero state
    )
    address = f"127.0.0.1:{server.port}"
    done = await run("--address", address, "stream", "--batch", "2", stdin=lines)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["seq"] for r in records] == [5, 5, 7, 8, 8, 9]
    assert [r["duplicate"] for r in records] == [False, True, False, False, True, False]
    assert [r["step"] for r in records] == [1, 1, 2, 3, 3, 4]
    ref = Reference()
    applied = {0: ref.step("q", x[0]), 2: ref.step("q", x[2]), 3: ref.step("q", x[3])}
    applied[5] = ref.step("q", x[5], reset=True)
    for k, expected in applied.items():
        np.testing.assert_allclose(records[k]["output"], expected, atol=1e-5)
    np.testing.assert_allclose(records[1]["output"], records[0]["output"])  # the last applied
    got_q = await run("--address", address, "get", "q")
    assert got_q.returncode == 0, (got_q.returncode, got_q.stderr)
    got = json.loads(got_q.stdout)
    assert (got["step"], got["last_seq"]) == (4, 9)


async def test_running_a_file_again_after_a_partial_failure_applies_nothing_twice(
    server: Server, tmp_path: Path
) -> None:
    """The first run dies (SIGKILL) after three of six answers; the second run of the whole
    file answers those three duplicate and applies the rest: six events, once each."""
    x = np.random.default_rng(8).standard_normal((6, 32)).astype(np.float32).tolist()
    lines = [jsonl({"session_id": "file", "values": v, "seq": 100 + k}) for k, v in enumerate(x)]
    source = tmp_path / "events.jsonl"
    source.write_text("".join(lines))
    address = f"127.0.0.1:{server.port}"
    first = await start_client("--address", address, "stream", "--batch", "1")
    assert first.stdin is not None and first.stdout is not None
    try:
        first.stdin.write("".join(lines[:3]).encode())
        await first.stdin.drain()
        answered = [
            json.loads(await asyncio.wait_for(first.stdout.readline(), 30)) for _ in range(3)
        ]
    finally:
        first.kill()
        await first.wait()
    assert [r["step"] for r in answered] == [1, 2, 3]
    again = await run("--address", address, "stream", str(source))
    assert again.returncode == 0, again.stderr
    records = [json.loads(line) for line in again.stdout.splitlines()]
    assert [r["duplicate"] for r in records] == [True] * 3 + [False] * 3
    assert [r["step"] for r in records] == [3, 3, 3, 4, 5, 6]
    ref = Reference()
    expected = [ref.step("file", v) for v in x]
    np.testing.assert_allclose(records[-1]["output"], expected[-1], atol=1e-5)


async def test_csv_header_names_seq_and_reset_columns(server: Server, tmp_path: Path) -> None:
    values = [f"v{i}" for i in range(32)]
    rows = [",".join(["session_id", "seq", *values[:10], "reset", *values[10:]])]
    for seq, reset, v in (("3", "", "0.5"), ("3", "false", "0.25"), ("", "1", "0.75")):
        rows.append(",".join(["cs", seq, *[v] * 10, reset, *[v] * 22]))
    rows.append(",".join(["cs", "4", "0.5"]))  # fewer columns than the header
    source = tmp_path / "events.csv"
    source.write_text("\n".join(rows) + "\n")
    done = await run("--address", f"127.0.0.1:{server.port}", "stream", str(source))
    assert done.returncode == 1
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(r.get("seq"), r.get("duplicate"), r.get("step")) for r in records[:3]] == [
        (3, False, 1),
        (3, True, 1),
        (4, False, 2),
    ]
    ref = Reference()
    ref.step("cs", np.full(32, 0.5, np.float32))
    expected = ref.step("cs", np.full(32, 0.75, np.float32), reset=True)
    np.testing.assert_allclose(records[2]["output"], expected, atol=1e-5)
    assert records[3] == {"line": 5, "session_id": "cs", "error": "3 columns; the header has 35"}


async def test_unknown_keys_and_values_beyond_float32_refuse_their_line(server: Server) -> None:
    good = [0.5] * 32
    lines = jsonl(
        {"session_id": "k", "values": good, "rest": True},  # a typo of reset
        {"session_id": "k", "values": [1e39, *good[1:]]},
        {"session_id": "k", "values": [-(10**400), *good[1:]]},
        {"session_id": "k", "values": good, "seq": 0},
        {"session_id": "k", "values": good, "seq": "9"},
        {"session_id": "k", "values": good},
    )
    address = f"127.0.0.1:{server.port}"
    done = await run("--address", address, "stream", stdin=lines)
    assert done.returncode == 1
    records = [json.loads(line) for line in done.stdout.splitlines()]
    errors = [r.get("error") for r in records]
    assert (
        errors[0]
        == "unknown key 'rest' (a line has session_id, values, and optionally seq and reset)"
    )
    assert errors[1] == "values out of float32 range (1e+39)"
    assert errors[2] == "values out of float32 range"
    seq_rule = "'seq' must be a whole number from 1 to 2^64-1 (or left out); got"
    assert (errors[3], errors[4]) == (f"{seq_rule} 0", f"{seq_rule} '9'")
    assert errors[5] is None and records[5]["step"] == 1  # only the good line was applied
    assert all(r["session_id"] == "k" for r in records)
    assert done.stderr.splitlines() == [
        f"lstm-client: line {n}: session 'k': {e}" for n, e in zip(range(1, 6), errors[:5])
    ]  # no RuntimeWarning from numpy


async def test_a_terminal_on_stdin_is_told_what_to_type(server: Server) -> None:
    primary, secondary = pty.openpty()
    try:
        proc = await start_client(
            "--address", f"127.0.0.1:{server.port}", "stream", stdin=secondary
        )
    finally:
        os.close(secondary)
    assert proc.stdout is not None and proc.stderr is not None
    try:
        hint = await asyncio.wait_for(proc.stderr.readline(), 30)
        assert hint.decode() == (
            "lstm-client: reading events from stdin (JSONL, one per line); Ctrl-D ends\n"
        )
        os.write(primary, jsonl({"session_id": "tty", "values": [0.5] * 32}).encode())
        os.write(primary, b"\x04")  # Ctrl-D at the start of a line: end of input
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        os.close(primary)
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    assert json.loads(out.decode())["step"] == 1 and err == b""


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
    for rule in (  # the input format, in stream's help
        "seq and reset are optional; any other key refuses the line",
        'otherwise it comes back "duplicate": true and changes nothing',
        'a header may name a "seq" and a "reset" column',
        "On a terminal, stdin is read until Ctrl-D",
    ):
        assert rule in texts["stream"], rule
