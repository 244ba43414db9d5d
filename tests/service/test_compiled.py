"""The compiled hot path: extension modules, required at start, inside the layer rules."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lstm_stream.v1 import lstm_stream_pb2 as pb
from service.api.codec import read_step_request
from service.core.scan import first_per_row
from service.counts import add_at
from service.launch import COMPILED
from service.state.rows import advanced, put_counters, put_rows, take_rows

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


# -- the arrays the compiled functions are handed (service/arrays.pxd) ------------------


def _wrong_arrays() -> list[tuple[str, np.ndarray]]:
    rows = np.array([1, 2], np.int64)
    return [
        ("another dtype", rows.astype(np.int32)),
        ("not contiguous", np.arange(4, dtype=np.int64)[1::2]),
        ("big-endian", rows.astype(">i8")),
        ("2-D", rows.reshape(1, 2)),
    ]


@pytest.mark.parametrize(("what", "wrong"), _wrong_arrays())
def test_a_wrong_array_is_refused_before_anything_is_read_or_written(
    what: str, wrong: np.ndarray
) -> None:
    """What a typed memoryview refused, the raw access refuses too: ValueError, never a
    read or write through the wrong layout."""
    counts = np.zeros(4, np.int32)
    with pytest.raises(ValueError, match="expected a C-contiguous 1-D int64 array"):
        add_at(counts, wrong, 1)
    assert not counts.any()


def test_an_array_to_write_into_must_be_writable_and_an_array() -> None:
    counts = np.zeros(4, np.int32)
    counts.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        add_at(counts, np.array([1], np.int64), 1)
    with pytest.raises(TypeError, match="expected a numpy array, got list"):
        add_at(np.zeros(4, np.int32), [1, 2], 1)  # type: ignore[arg-type]


def _counters(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.zeros(n, np.uint64), np.zeros(n, np.uint64), np.zeros(n)


def _news(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.ones(n, np.uint64), np.ones(n, np.uint64)


def test_a_row_outside_the_table_is_refused_and_nothing_is_written() -> None:
    """A slot out of range is a bug upstream; it raises rather than writing past the end."""
    table = np.zeros((4, 3), np.float32)
    with pytest.raises(IndexError, match="slot 4 outside a table of 4 rows"):
        put_rows(table, np.array([1, 4], np.int64), np.ones((2, 3), np.float32))
    with pytest.raises(IndexError):
        take_rows(table, np.array([-1], np.int64))
    step, last, updated = _counters(4)
    with pytest.raises(IndexError):
        put_counters(step, last, updated, np.array([0, 9], np.int64), *_news(2), 1.0)
    with pytest.raises(IndexError):
        advanced(step, last, np.array([7], np.int64), None)
    counts = np.zeros(4, np.int32)
    with pytest.raises(IndexError):
        add_at(counts, np.array([0, 4], np.int64), 1)
    with pytest.raises(IndexError):
        first_per_row(np.array([0, 5], np.int64), 8, np.full(4, -1, np.int64))
    assert not table.any() and not step.any() and not updated.any() and not counts.any()


def test_the_columnar_values_are_a_read_only_view_of_the_request_bytes() -> None:
    values = np.arange(6, dtype="<f4").reshape(2, 3)
    data = pb.StepRequest(
        batch=pb.EventBatch(session_ids=["a", "b"], values=values.tobytes())
    ).SerializeToString()
    request = read_step_request(data)
    view, bad = request.values(3)
    assert bad is None and view.dtype == np.float32 and view.shape == (2, 3)
    np.testing.assert_array_equal(view, values)
    assert not view.flags.writeable and not view.flags.owndata
    assert view.base is request.data  # no copy: the bytes gRPC received
