"""The compiled hot path: extension modules, required at start, inside the layer rules."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from service.launch import COMPILED

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", COMPILED)
def test_each_hot_path_module_is_the_compiled_one(name: str) -> None:
    """No Python file of the same name shadows it: one source of truth, the .pyx."""
    module = importlib.import_module(name)
    assert module.__file__ is not None and module.__file__.endswith(".so")
    source = ROOT / (name.replace(".", "/") + ".pyx")
    assert source.exists() and not source.with_suffix(".py").exists()
    assert source.with_suffix(".pyi").exists()  # the typed face mypy reads


@pytest.mark.parametrize("name", COMPILED)
def test_lstm_serve_without_the_compiled_module_says_so_in_one_line(name: str) -> None:
    blocked = f"import sys; sys.modules[{name!r}] = None; from service.launch import main; "
    done = subprocess.run(
        [sys.executable, "-c", blocked + "sys.exit(main(['--port', '0']))"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("lstm-serve: the compiled hot path is not built")
    assert name in lines[0] and "pip install" in lines[0]


FORBIDDEN_INSIDE = ("grpc", "google.protobuf", "lstm_stream", "service.api", "service.server")


def imports_of(source: Path) -> list[str]:
    """What a .pyx file imports or cimports (module names)."""
    names = []
    for line in source.read_text().splitlines():
        found = re.match(r"\s*(?:from\s+(\S+)\s+c?import|c?import\s+(\S+))", line)
        if found:
            names.append(found.group(1) or found.group(2))
    return names


def test_compiled_core_and_counts_import_no_transport() -> None:
    sources = [ROOT / "service" / "counts.pyx", *sorted((ROOT / "service/core").glob("*.pyx"))]
    assert len(sources) >= 2
    for source in sources:
        for name in imports_of(source):
            assert not name.startswith(FORBIDDEN_INSIDE), f"{source.name} imports {name}"


def test_the_import_scan_sees_a_forbidden_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pyx"
    bad.write_text("from libc.stdint cimport int64_t\nimport grpc\nfrom lstm_stream.v1 import x\n")
    assert imports_of(bad) == ["libc.stdint", "grpc", "lstm_stream.v1"]
