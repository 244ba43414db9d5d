"""lstm_bench.gpu rehearsed on the CPU: run split, device-state rows, model check, load table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest

from lstm_bench import procs
from tests.conftest import DEVICE
from tests.model_export.frameworks import SPECS

PHASES = ("gather", "upload", "compute", "download", "scatter")


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        # The tool (and so the servers it starts) dies with the test process.
        procs.dying([sys.executable, "-m", "lstm_bench.gpu", *args]),
        capture_output=True,
        text=True,
        timeout=100,
    )


def test_quick_run_writes_every_phase_and_the_model_check(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    done = bench("--quick", "--check-models", "--seconds", "0.01", "--sessions", "1000", "4096",
                 "--device", "cpu", "--layers", "2", "--load", "cpu", "--load-seconds", "0.5",
                 "--out", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert (result["provider"], result["device"]) == ("CPUExecutionProvider", "cpu")
    assert result["machine"]["gpu"] is None and result["tf32"] is False
    assert result["onnxruntime"]["version"] == ort.__version__
    grid = {(r["hidden"], r["layers"], r["batch"]) for r in result["rows"]}
    assert grid == {(64, 2, 16), (64, 2, 256)}
    for row in result["rows"]:
        assert all(row[f"{p}_us"] > 0 for p in PHASES), row
        assert row["split_total_us"] == pytest.approx(sum(row[f"{p}_us"] for p in PHASES), 0.01)
        assert row["plain_us"] > 0 and row["devstate_us"] > 0
        assert row["state_bytes_per_run"] == row["batch"] * 2 * row["hidden"] * row["layers"] * 4
    assert [r["live_sessions"] for r in result["sessions_rows"]] == [1000, 4096]
    checked = {m["model"]: m for m in result["models"]}
    assert set(checked) == {"seed", "torch_step_2layer_linear_sigmoid", *(p.stem for p in SPECS)}
    assert checked["lstm_3layer_proj_linear"]["against"] == "float64 reference"
    assert all(m["ok"] and m["max_abs_diff"] <= 1e-5 for m in checked.values()), checked
    assert "tf32_max_abs_diff" not in checked["seed"]  # TF32 exists on CUDA only
    # The load generator against lstm-serve with each model: answered, batched, timed.
    load = {(r["device"], r["hidden"], r["layers"]): r for r in result["load_rows"]}
    assert set(load) == {("cpu", 64, 2)}
    for row in load.values():
        assert row["events_per_s"] > 0 and row["errors"] == 0 and row["mean_batch"] >= 1
        assert 0 < row["p50_ms"] <= row["p99_ms"]


@pytest.mark.skipif(DEVICE == "cuda", reason="checks the failure on a machine without CUDA")
def test_cuda_without_cuda_is_one_line_and_exit_1(tmp_path: Path) -> None:
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    done = bench("--device", "cuda", "--quick", "--out", str(tmp_path / "gpu.json"))
    assert done.returncode == 1
    assert (
        done.stderr.splitlines()
        == [
            line
            for line in done.stderr.splitlines()
            if line.startswith("lstm_bench.gpu: --device cuda")
        ]
        and len(done.stderr.splitlines()) == 1
    )
    assert not (tmp_path / "gpu.json").exists()
