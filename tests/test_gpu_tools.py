"""tools/gpu_check.sh and tools/gpu_wheel.sh on a machine without a GPU: one clear line each."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(tool: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(ROOT / "tools" / tool), *args],
        capture_output=True,
        text=True,
        timeout=100,
        env={**os.environ, **env},
    )


def no_gpu_path() -> str:
    """PATH without any nvidia-smi: the tools see a machine without a GPU."""
    keep = [
        d for d in os.environ["PATH"].split(os.pathsep) if not (Path(d) / "nvidia-smi").exists()
    ]
    return os.pathsep.join(keep)


def test_gpu_check_without_a_gpu_skips_in_one_line(tmp_path: Path) -> None:
    done = run("gpu_check.sh", PATH=no_gpu_path())
    assert (done.returncode, done.stderr) == (0, "")
    assert (
        done.stdout == "gpu_check: SKIPPED: no NVIDIA GPU on this machine (nvidia-smi finds none)\n"
    )
    required = run("gpu_check.sh", PATH=no_gpu_path(), GPU_CHECK_REQUIRE="1")
    assert required.returncode == 1 and required.stdout == done.stdout


def test_gpu_check_with_a_gpu_but_no_cuda_build_says_what_to_install(tmp_path: Path) -> None:
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    fake = tmp_path / "bin" / "nvidia-smi"  # a GPU as far as nvidia-smi -L goes
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'GPU 0: stand-in'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    done = run(
        "gpu_check.sh",
        PATH=f"{fake.parent}{os.pathsep}{no_gpu_path()}",
        GPU_PYTHON=sys.executable,
        GPU_PARTS=str(tmp_path),  # no parts carried
        GPU_STASH=str(tmp_path / "stash"),
        GPU_SITE=str(tmp_path / "site"),
    )
    assert done.returncode == 1 and done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert (
        line.startswith("gpu_check: onnxruntime in ") and "has no CUDA execution provider" in line
    )
    assert "tools/gpu_wheel.sh fetch" in line


def test_gpu_wheel_without_parts_and_with_bad_usage(tmp_path: Path) -> None:
    stash = run("gpu_wheel.sh", "stash", GPU_PARTS=str(tmp_path), GPU_STASH=str(tmp_path / "s"))
    assert stash.returncode == 1
    assert stash.stderr.splitlines() == [
        "gpu_wheel: no part here (.gpu1/ ... .gpu5/ come from 'tools/gpu_wheel.sh fetch')"
    ]
    usage = run("gpu_wheel.sh", "unpack")
    assert usage.returncode == 1
    assert usage.stderr == "gpu_wheel: usage: tools/gpu_wheel.sh fetch | stash | install [DIR]\n"


def test_gpu_check_rehearsal_runs_every_step_on_the_cpu(tmp_path: Path) -> None:
    """--rehearse: the measurements, then the tests, their summary merged into the JSON."""
    out = tmp_path / "rehearsal.json"
    done = run(
        "gpu_check.sh",
        "--rehearse",
        GPU_PYTHON=sys.executable,
        GPU_OUT=str(out),
        GPU_TESTS="tests/service/test_settings.py",
        GPU_BENCH_ARGS="--quick --hidden 64 --layers 1 --batches 16 --seconds 0.01 --sessions 1000",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1] == f"gpu_check: passed; wrote {out}"
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and len(result["rows"]) == 1
    assert all(m["ok"] for m in result["models"])
    tests = result["end_to_end_tests"]
    assert tests["files"] == ["tests/service/test_settings.py"]
    assert tests["summary"].startswith("rc=0: ") and " passed" in tests["summary"]
