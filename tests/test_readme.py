"""The README's and docs' examples run as written against a real server; their tables
name every flag and every metric."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from service.metrics import Metrics
from service.server import Server
from service.settings import Settings
from tests.conftest import ServerFactory

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
OPERATIONS = ROOT / "docs" / "OPERATIONS.md"
RUNNABLE = ["README.md", "docs/CLIENT.md", "docs/SCALING.md", "docs/MODELS.md"]
"""The pages whose ``python`` blocks are complete programs (the TLS and Triton ones run
in tests/service/test_security.py and tests/oip/test_triton_client.py)."""


def python_blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / page).read_text(), re.S)


def section(text: str, heading: str) -> str:
    """The text under ``## heading`` up to the next heading of that level."""
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


async def test_the_python_examples_run(
    server: Server, start_server: ServerFactory, tmp_path: Path
) -> None:
    second = await start_server()  # the second replica of the sharding example
    outputs: dict[str, str] = {}
    for page in RUNNABLE:
        blocks = python_blocks(page)
        assert blocks, f"{page} has no python example"
        outputs[page] = ""
        for block in blocks:
            code = block.replace("127.0.0.1:50051", f"127.0.0.1:{server.port}")
            code = code.replace("127.0.0.1:50052", f"127.0.0.1:{second.port}")
            # In a thread: the server under test runs on this event loop.
            result = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-c", code],
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert result.returncode == 0, f"{page}: {result.stderr}"
            outputs[page] += result.stdout
    assert "library: [2, 1, 3] (3, 64) True" in outputs["README.md"]
    assert "library stream step 3 SERVING" in outputs["README.md"]
    assert "columnar: (1000, 64) all ok: True" in outputs["docs/CLIENT.md"]
    assert "stream step 4" in outputs["docs/CLIENT.md"]
    assert "sharded: True [1, 1, 1] True" in outputs["docs/SCALING.md"]
    assert (tmp_path / "params.npz").exists()  # docs/MODELS.md's parameter file


async def test_the_quick_start_answers_a_first_event(server: Server) -> None:
    """The Quick start's commands, as written (lstm-client pointed at the test's port),
    print SERVING and one result line, and the README shows that line as it is printed."""
    text = README.read_text()
    quick = section(text, "Quick start")
    [commands] = re.findall(r"```sh first-event\n(.*?)```", quick, re.S)
    [shown] = re.findall(r"```text\nSERVING\n(.*?)\n```", quick, re.S)
    script = commands.replace(".venv/bin/", f"{Path(sys.executable).parent}/")
    script = script.replace("python3 -c", f"{sys.executable} -c")
    script = script.replace("lstm-client ", f"lstm-client --address 127.0.0.1:{server.port} ")
    result = await asyncio.to_thread(
        subprocess.run,
        ["bash", "-euo", "pipefail", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    health, line = result.stdout.splitlines()
    assert health == "SERVING"
    got = json.loads(line)
    assert (got["step"], got["duplicate"], len(got["output"])) == (1, False, 64)
    expected = json.loads(shown.replace(", ...]", "]"))
    assert list(expected) == list(got)  # the same keys, in the printed order
    assert {k: v for k, v in expected.items() if k != "output"} == {
        k: v for k, v in got.items() if k != "output"
    }
    assert abs(expected["output"][0] - got["output"][0]) < 1e-6


def test_every_flag_is_in_the_operations_table() -> None:
    table = section(OPERATIONS.read_text(), "Configuration")
    flags = [f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(Settings)]
    missing = [flag for flag in flags if f"`{flag}`" not in table]
    assert not missing, f"flags missing from docs/OPERATIONS.md's table: {missing}"
    listed = set(re.findall(r"^\| `(--[a-z-]+)`", table, re.M))
    listed |= set(re.findall(r"^\| `--[a-z-]+`, `(--[a-z-]+)`", table, re.M))
    assert listed - set(flags) == set(), "rows for flags lstm-serve does not have"


def test_every_metric_is_in_the_operations_table() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.track_live_sessions(list)  # the live-session gauges are a collector of their own
    served = set()
    for family in registry.collect():
        if family.name.startswith("process_"):
            continue  # the standard process collector: one row, `process_*`
        served.add(family.name + ("_total" if family.type == "counter" else ""))
    table = section(OPERATIONS.read_text(), "Metrics")
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    listed = {name for row in rows for name in re.findall(r"`(\w+)`", row.split("|")[1])}
    assert "process_" in table
    assert served - listed == set(), "metrics missing from docs/OPERATIONS.md's table"
    assert listed - served == set(), "rows for metrics the server does not export"


DEV_TOOLS = ("pytest", "ruff", "mypy", "hadolint", "grpcio-tools", "hypothesis", "cython-lint")


def make_dry_run(target: str, venv: Path) -> str:
    """What ``make TARGET`` would run with ``.venv`` at ``venv`` (nothing is executed)."""
    if shutil.which("make") is None:
        pytest.skip("no make on this machine")
    done = subprocess.run(
        ["make", "-n", target, f"VENV={venv}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_make_run_installs_what_running_needs_and_test_the_dev_tools(tmp_path: Path) -> None:
    """The README's install story: ``make run`` on a fresh clone is ``pip install -e .``
    (what ``pip install .`` gives), the dev tools come with ``make test``/``make lint``."""
    run = make_dry_run("run", tmp_path / "venv")
    assert "pip install -q -e .\n" in run and "[dev]" not in run
    assert "lstm-serve --port 50051 --metrics-port 9464" in run
    for target in ("test", "lint"):
        assert "pip install -q -e '.[dev]'" in make_dry_run(target, tmp_path / "venv"), target
    # After make test, make run installs nothing more: the dev stamp covers running.
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "venv" / "bin" / "python").touch()
    (tmp_path / "venv" / ".installed-run").touch()
    assert "pip" not in make_dry_run("run", tmp_path / "venv")


def test_the_packages_dependencies_hold_no_dev_tool() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = [re.split(r"[\s<>=!~;\[]", d, maxsplit=1)[0] for d in project["dependencies"]]
    assert [n for n in names if n.startswith(DEV_TOOLS)] == []
    dev = " ".join(project["optional-dependencies"]["dev"])
    assert all(tool.split("-")[0] in dev for tool in ("pytest", "ruff", "mypy", "hadolint"))
