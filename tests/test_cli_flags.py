"""Every command line refuses an abbreviated flag (exit 2) instead of guessing what it meant."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from lstm_bench import cli as bench_cli
from lstm_bench import echo
from lstm_stream import cli as client_cli
from service.settings import Settings
from tests.service.test_lifecycle import SERVE

ROOT = Path(__file__).resolve().parent.parent


def exit_code(parse: Callable[[], object]) -> int | str | None:
    with pytest.raises(SystemExit) as exited:
        parse()
    return exited.value.code


def test_lstm_serve_refuses_an_abbreviated_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert Settings.from_args(["--max-batch", "5"], env={}).max_batch == 5
    assert exit_code(lambda: Settings.from_args(["--max-batc", "5"], env={})) == 2
    assert "unrecognized arguments: --max-batc" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "env", "words"),
    [
        (
            ["--max-batc", "5"],
            {},
            "unrecognized arguments: --max-batc 5; did you mean --max-batch?",
        ),
        (["--port", "http"], {}, "argument --port: invalid int value: 'http'"),
        (["--port", "70000"], {}, "--port must be 0..65535"),
        ([], {"LSTM_MAX_BATCH": "many"}, "LSTM_MAX_BATCH='many' is not a valid int"),
    ],
)
def test_a_usage_error_of_lstm_serve_is_one_line(
    argv: list[str], env: dict[str, str], words: str
) -> None:
    """The real command: one line naming the problem (and the flag meant), exit 2; not the
    usage block of every flag."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LSTM_")}
    done = subprocess.run(
        [*SERVE, *argv], capture_output=True, text=True, timeout=60, env={**clean, **env}
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [f"lstm-serve: error: {words} (--help lists every flag)"], (
        done.stderr
    )


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--addr=127.0.0.1:1", "info"], "--addr"),  # a global option before the command
        (["info", "--addr", "127.0.0.1:1"], "--addr"),  # and after it
        (["--retry=1", "health"], "--retry"),
        (["stream", "--form", "csv"], "--form"),  # --format
        (["stream", "--out", "x.jsonl"], "--out"),  # --output
    ],
)
def test_lstm_client_refuses_an_abbreviated_flag(
    argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert exit_code(lambda: client_cli.main(argv)) == 2
    assert f"unrecognized arguments: {flag}" in capsys.readouterr().err


def test_lstm_bench_and_the_echo_server_refuse_an_abbreviated_flag(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert bench_cli.parse_args(["--streams", "4"]).streams == 4
    assert exit_code(lambda: bench_cli.parse_args(["--stream", "4"])) == 2
    assert exit_code(lambda: bench_cli.parse_args(["--addr", "127.0.0.1:1"])) == 2
    assert exit_code(lambda: echo.main(["--por", "0"])) == 2
    assert "unrecognized arguments: --por" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [["tools/gen_proto.py", "--ou", "/nonexistent"], ["tools/render_dashboard.py", "--min", "1"]],
)
def test_tools_refuse_an_abbreviated_flag(argv: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done.stderr
    assert "unrecognized arguments" in done.stderr
