"""One run split into host gather, upload, compute, download and scatter, on the CPU or a GPU.

``python -m lstm_bench.gpu --device cpu|cuda[:N] [--quick] [--check-models] [--load DEVICE ...]``
``--out FILE``

For each stacked LSTM (random weights from ``model_export``, E = 32, H = 64,
256, 1024, 1 and 2 layers) and batch size (16 … 4096), a run of the host-table
path is timed phase by phase, as the server does it today: gather the run's
state rows from a host table of ``live_sessions`` rows, upload event and states
as device OrtValues, compute (``run_with_iobinding``, outputs left on the
device), download output and new states, scatter them back into the table.
The same batch is then timed through ``service.devstate`` (state pools on the
device: only events and outputs cross) and through a plain ``session.run``.

``--check-models`` also serves the seed model and every framework fixture on
the device and records the largest difference from the float64 reference (with
TF32 off, and on where the device is CUDA). ``--load cpu cuda`` adds the load
generator's columnar run (as ``make bench``: lstm-serve pinned to one core)
against each model on each device: events/s, p50, p99, mean batch. Everything
lands in one JSON file (``docs/perf/gpu.json`` from ``tools/gpu_check.sh``).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from model_export.arch import random_architecture
from model_export.graph import build_step_model
from service.devstate import DeviceState
from service.runtime import TF32_TOLERANCE, CudaOptions, Runtime, open_session, parse_device

EVENT_SIZE = 32
HIDDEN = (64, 256, 1024)
LAYERS = (1, 2)
BATCHES = (16, 64, 256, 1024, 4096)
QUICK: dict[str, Any] = {"hidden": (64,), "layers": (1, 2), "batches": (16, 256), "seconds": 0.05}
FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "frameworks"
TOLERANCE = 1e-5
PHASES = ("gather", "upload", "compute", "download", "scatter")


def step_model(hidden: int, layers: int) -> bytes:
    arch = random_architecture("lstm", EVENT_SIZE, hidden, layers=layers, seed=hidden + layers)
    return build_step_model(arch).SerializeToString()


def _median_us(fn: Callable[[], object], seconds: float, at_least: int = 3) -> float:
    """Median wall time of ``fn`` in µs, over at least ``at_least`` calls or ``seconds``."""
    fn()  # warm: the first call at a shape allocates
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < at_least or time.perf_counter() < deadline:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        if len(times) >= 1000:
            break
    return float(np.median(times)) * 1e6


class SplitRun:
    """The host-table path of one run with each phase a separate call, so each can be timed."""

    def __init__(self, model: bytes, device: str, live: int, batch: int, threads: int):
        self.runtime = Runtime(model, "bench", device, threads)
        self.session, _ = open_session(model, "bench", device, threads)
        index = parse_device(device)[1]
        self.where = ("cuda", index) if self.runtime.device.startswith("cuda") else ("cpu", 0)
        spec = self.runtime.spec
        rng = np.random.default_rng(batch)
        self.names = spec.state_names
        self.tables = [rng.standard_normal((live, n)).astype(np.float32) for n in spec.state_sizes]
        self.slots = np.sort(rng.choice(live, batch, replace=False))
        self.event = rng.standard_normal((batch, spec.event_size)).astype(np.float32)
        self.outputs = ["output", *(f"{n}_out" for n in self.names)]
        self.gathered: list[np.ndarray] = []
        self.uploaded: list[ort.OrtValue] = []
        self.downloaded: list[np.ndarray] = []
        self.io = self.session.io_binding()

    def gather(self) -> None:
        self.gathered = [table[self.slots] for table in self.tables]

    def upload(self) -> None:
        arrays = [self.event, *self.gathered]
        self.uploaded = [ort.OrtValue.ortvalue_from_numpy(a, *self.where) for a in arrays]

    def compute(self) -> None:
        io = self.io
        for name, value in zip(("event", *self.names), self.uploaded):
            io.bind_ortvalue_input(name, value)
        for name in self.outputs:
            io.bind_output(name, *self.where)
        self.session.run_with_iobinding(io)  # synchronises the device before it returns

    def download(self) -> None:
        self.downloaded = [v.numpy() for v in self.io.get_outputs()]

    def scatter(self) -> None:
        for table, rows in zip(self.tables, self.downloaded[1:]):
            table[self.slots] = rows

    def plain(self) -> None:
        """What the server's runtime does: numpy in, numpy out, ORT copying inside."""
        gathered = [table[self.slots] for table in self.tables]
        _, new = self.runtime.run(self.event, gathered)
        for table, rows in zip(self.tables, new):
            table[self.slots] = rows


def bench_row(
    hidden: int, layers: int, batch: int, device: str, seconds: float, threads: int, live: int
) -> dict[str, Any]:
    model = step_model(hidden, layers)
    split = SplitRun(model, device, live, batch, threads)
    for phase in PHASES[:-1]:  # the first pass allocates what the timed ones reuse
        getattr(split, phase)()
    row: dict[str, Any] = {
        "hidden": hidden,
        "layers": layers,
        "batch": batch,
        "live_sessions": live,
        "state_bytes_per_run": int(sum(t.shape[1] for t in split.tables) * 4 * batch),
    }
    for phase in PHASES:
        row[f"{phase}_us"] = round(_median_us(getattr(split, phase), seconds), 2)
    row["split_total_us"] = round(sum(row[f"{p}_us"] for p in PHASES), 2)
    row["plain_us"] = round(_median_us(split.plain, seconds), 2)
    row["devstate_us"] = round(devstate_us(model, split, live, device, seconds, threads), 2)
    for key in ("plain", "devstate"):
        row[f"{key}_events_per_s"] = round(batch / row[f"{key}_us"] * 1e6)
    return row


def devstate_us(
    model: bytes, split: SplitRun, live: int, device: str, seconds: float, threads: int
) -> float:
    state = DeviceState(model, split.runtime.spec, live, device, threads)
    return _median_us(lambda: state.run(split.event, split.slots), seconds)


def sessions_rows(
    device: str, seconds: float, threads: int, counts: Sequence[int], hidden: int = 256
) -> list[dict[str, Any]]:
    """Device-state run time at a fixed batch against live sessions (pool rows)."""
    model = step_model(hidden, 1)
    spec = Runtime(model, "bench", device, threads).spec
    batch = 256
    rows = []
    for live in counts:
        us = _pool_run_us(model, spec, live, batch, device, seconds, threads)
        row = {"hidden": hidden, "layers": 1, "batch": batch, "live_sessions": live}
        rows.append({**row, "devstate_us": round(us, 2)})
    return rows


def _pool_run_us(
    model: bytes, spec: Any, live: int, batch: int, device: str, seconds: float, threads: int
) -> float:
    state = DeviceState(model, spec, live, device, threads)
    rng = np.random.default_rng(live)
    slots = rng.choice(live, batch, replace=False)
    event = rng.standard_normal((batch, EVENT_SIZE)).astype(np.float32)
    return _median_us(lambda: state.run(event, slots), seconds)


def load_rows(
    devices: Sequence[str],
    hidden: Sequence[int],
    layers: Sequence[int],
    duration: float,
    client_procs: int = 2,
) -> list[dict[str, Any]]:
    """The load generator's columnar run (as ``make bench``: the server pinned to one core)
    against lstm-serve with each model on each device: events/s, p50, p99, mean batch."""
    from lstm_bench import procs
    from lstm_bench.cli import cpu_split, measure
    from lstm_bench.load import Shape

    server_cpus, client_cpus = cpu_split(True)
    shape = Shape(duration=duration, warmup=1.0, event_size=EVENT_SIZE)
    rows = []
    with tempfile.TemporaryDirectory(prefix="lstm-gpu-load-") as work:
        for h in hidden:
            for n in layers:
                model = Path(work) / f"lstm_h{h}_l{n}.onnx"
                model.write_bytes(step_model(h, n))
                for device in devices:
                    extra = ["--model", str(model), "--device", device, "--log-level", "WARNING"]
                    target = procs.start("server", server_cpus, extra)
                    try:
                        run = measure(
                            target, shape, f"{device} H={h} L={n}", client_procs, client_cpus
                        )
                    finally:
                        target.stop()
                    rows.append(
                        {
                            "device": device,
                            "hidden": h,
                            "layers": n,
                            "form": shape.form,
                            "streams": shape.streams,
                            "events_per_request": shape.events_per_request,
                            "events_per_s": round(run["events_per_s"]),
                            "p50_ms": round(run["latency_ms"]["p50"], 3),
                            "p99_ms": round(run["latency_ms"]["p99"], 3),
                            "mean_batch": run["mean_batch"] and round(run["mean_batch"], 1),
                            "errors": run["errors"],
                        }
                    )
                    print(f"load {device} H={h} L={n}: {rows[-1]}", flush=True)
    return rows


def _fixture_arch(info: dict[str, Any], where: Path) -> Any:
    """The Architecture ``lstm-export`` builds from a fixture's own export arguments."""
    from model_export.cli import parse_args

    args = parse_args([*info["export_args"], "--out", "unused.onnx"])
    if args.from_torch is not None:
        from model_export.torch_import import import_state_dict, load_state_dict

        return import_state_dict(
            load_state_dict(where / args.from_torch),
            rnn=args.rnn,
            head=args.head,
            output_activation=args.output_activation or "none",
        )
    from model_export.keras_import import load_keras

    return load_keras(where / args.from_keras)


def _served_difference(
    model: bytes, device: str, inputs: np.ndarray, want: np.ndarray, cuda: CudaOptions
) -> float:
    """Largest |output - reference| over whole sequences fed one step at a time on ``device``."""
    runtime = Runtime(model, "check", device, 1, cuda)
    states = [np.zeros((inputs.shape[0], n), np.float32) for n in runtime.spec.state_sizes]
    worst = 0.0
    for t in range(inputs.shape[1]):
        output, states = runtime.run(inputs[:, t].astype(np.float32), states)
        worst = max(worst, float(np.max(np.abs(output - want[:, t]))))
    return worst


def check_models(device: str, fixtures: Path) -> list[dict[str, Any]]:
    """The seed model and every framework fixture against the float64 reference, on ``device``."""
    from model_export import reference
    from model_export.arch import from_seed
    from model_export.default import default_model, default_parameters

    # (name, model, inputs [S, T, E], wanted outputs [S, T, O], what the wanted outputs are)
    cases: list[tuple[str, bytes, np.ndarray, np.ndarray, str]] = []

    def from_arch(name: str, model: bytes, arch: Any, inputs: np.ndarray) -> None:
        want, _ = reference.run_sequences(arch, inputs)
        cases.append((name, model, inputs, want, "float64 reference"))

    seed_inputs = np.random.default_rng(0).standard_normal((8, 50, 32))
    seed = default_model().SerializeToString()
    from_arch("seed", seed, from_seed(default_parameters()), seed_inputs)
    for path in sorted(fixtures.glob("*.json")):
        arch = _fixture_arch(json.loads(path.read_text()), fixtures)
        inputs = np.load(fixtures / f"{path.stem}.npz")["inputs"]
        from_arch(path.stem, build_step_model(arch).SerializeToString(), arch, inputs)
    for path in sorted(fixtures.glob("*.onnx")):
        # A graph PyTorch's exporter wrote: its weights are only in the graph, so the
        # wanted outputs are PyTorch's own (float32) over the same sequences.
        data = np.load(fixtures / f"{path.stem}.npz")
        cases.append(
            (path.stem, path.read_bytes(), data["inputs"], data["outputs"], "PyTorch float32")
        )
    on_cuda = parse_device(device)[0] != "cpu" and "CUDAExecutionProvider" in (
        ort.get_available_providers()
    )
    results = []
    for name, model, inputs, want, against in cases:
        diff = _served_difference(model, device, inputs, want, CudaOptions())
        result: dict[str, Any] = {
            "model": name,
            "against": against,
            "max_abs_diff": diff,
            "tolerance": TOLERANCE,
            "ok": diff <= TOLERANCE,
        }
        if on_cuda:
            tf32 = _served_difference(model, device, inputs, want, CudaOptions(tf32=True))
            result.update(tf32_max_abs_diff=tf32, tf32_tolerance=TF32_TOLERANCE)
            result["tf32_ok"] = tf32 <= TF32_TOLERANCE
        results.append(result)
    return results


def _gpu_name() -> str | None:
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def _ort_package() -> dict[str, str]:
    for name in ("onnxruntime-gpu", "onnxruntime"):
        try:
            return {"package": name, "version": importlib.metadata.version(name)}
        except importlib.metadata.PackageNotFoundError:
            continue
    return {"package": "onnxruntime", "version": ort.__version__}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lstm_bench.gpu",
        allow_abbrev=False,
        description="Time one run split into gather, upload, compute, download and scatter.",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--quick", action="store_true", help="a small grid (a rehearsal)")
    parser.add_argument("--hidden", type=int, nargs="+", help=f"hidden sizes (default {HIDDEN})")
    parser.add_argument("--layers", type=int, nargs="+", help=f"layer counts (default {LAYERS})")
    parser.add_argument("--batches", type=int, nargs="+", help=f"batch sizes (default {BATCHES})")
    parser.add_argument("--seconds", type=float, help="time per measurement (default 0.3)")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    parser.add_argument(
        "--sessions",
        type=int,
        nargs="*",
        help="live sessions for the device-state rows at H=256, batch 256 "
        "(default 1000 1000000; 1000 65536 with --quick)",
    )
    parser.add_argument(
        "--check-models", action="store_true", help="the seed and fixture models vs the reference"
    )
    parser.add_argument("--fixtures", type=Path, default=FIXTURES, help=argparse.SUPPRESS)
    parser.add_argument(
        "--load",
        nargs="*",
        metavar="DEVICE",
        help="also the load generator's columnar table against lstm-serve on these devices "
        "(e.g. cpu cuda), for every --hidden and --layers",
    )
    parser.add_argument(
        "--load-seconds", type=float, default=4.0, help="seconds measured per load run"
    )
    parser.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    args = parser.parse_args(argv)
    try:
        parse_device(args.device)
    except ValueError as exc:
        parser.error(str(exc))
    quick = QUICK if args.quick else {}
    hidden = args.hidden or quick.get("hidden", HIDDEN)
    layers = args.layers or quick.get("layers", LAYERS)
    batches = args.batches or quick.get("batches", BATCHES)
    seconds = args.seconds or float(quick.get("seconds", 0.3))  # type: ignore[arg-type]
    counts = args.sessions if args.sessions is not None else (
        [1000, 65536] if args.quick else [1000, 1_000_000]
    )  # fmt: skip

    from service.runtime import DeviceUnavailableError

    try:
        probe = Runtime(step_model(64, 1), "bench", args.device, args.threads)
    except DeviceUnavailableError as exc:
        print(f"lstm_bench.gpu: {exc}", file=sys.stderr)
        return 1
    result: dict[str, Any] = {
        "command": "python -m lstm_bench.gpu " + shlex.join(sys.argv[1:] if argv is None else argv),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "gpu": _gpu_name() if probe.device.startswith("cuda") else None,
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
        },
        "onnxruntime": _ort_package(),
        "provider": probe.provider,
        "device": probe.device,
        "threads": args.threads,
        "event_size": EVENT_SIZE,
        "tf32": False,
    }
    if args.check_models:
        result["models"] = check_models(args.device, args.fixtures)
        worst = max(result["models"], key=lambda m: m["max_abs_diff"])
        print(f"models: largest difference {worst['max_abs_diff']:.3g} ({worst['model']})")
    rows = []
    for h in hidden:
        for n in layers:
            for b in batches:
                live = max(4 * b, 16384)
                row = bench_row(h, n, b, args.device, seconds, args.threads, live)
                rows.append(row)
                print(
                    f"H={h} L={n} B={b}: "
                    + " ".join(f"{p}={row[f'{p}_us']:.0f}" for p in PHASES)
                    + f" | plain={row['plain_us']:.0f} devstate={row['devstate_us']:.0f} µs",
                    flush=True,
                )
    result["rows"] = rows
    result["sessions_rows"] = sessions_rows(args.device, seconds, args.threads, counts)
    if args.load:
        result["load_rows"] = load_rows(args.load, hidden, layers, args.load_seconds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=args.out.parent, delete=False, suffix=".tmp") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    os.replace(f.name, args.out)
    print(f"wrote {args.out}")
    failed = [m["model"] for m in result.get("models", []) if not m["ok"]]
    if failed:
        print(f"lstm_bench.gpu: over {TOLERANCE:g} from the reference: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
