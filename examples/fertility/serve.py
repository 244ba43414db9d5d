"""The trained forecaster end to end: export, serve, stream, upgrade mid-stream, look.

``python examples/fertility/serve.py [--png PATH]`` (``make example``), from the
repository root with ``.venv``; no torch needed:

1. exports version 1 (``models/v1.safetensors``) with ``lstm-export`` into a model
   repository whose config says ``retire_policy: replay`` with 64 kept events;
2. starts ``lstm-serve`` on it (polling the repository);
3. streams the 24 countries' years through the client library, one request per
   year; halfway it exports version 2 into the repository and goes on streaming
   while the server loads it, replays each session's years on it, and moves the
   sessions over;
4. streams the same CSV through ``lstm-client`` to a second model that starts on
   version 2;
5. checks every served forecast against PyTorch's own (``models/predictions.npz``)
   and draws them against the truth, coloured by the version that answered.

With replay, a session that moves to version 2 gets the state version 2 would
have after the whole series so far: every forecast equals PyTorch's for the
version that made it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lstm_stream.client import Client

HERE = Path(__file__).resolve().parent
MODELS = HERE / "models"
BIN = Path(sys.executable).parent
MODEL = "fertility"
CONFIG = """name: "%s"
version_policy: { latest: { num_versions: 1 } }
parameters: { key: "retire_policy" value: { string_value: "replay" } }
parameters: { key: "replay_events" value: { string_value: "64" } }
"""
TOLERANCE = 1e-5


@dataclass
class Served:
    """What the server answered: ``[session, year]`` forecasts and the versions that made them."""

    outputs: np.ndarray
    versions: np.ndarray
    switch: int
    """The first year streamed after version 2 was put into the repository."""
    cli_outputs: np.ndarray
    cli_versions: np.ndarray


def export(repo: Path, model: str, version: int) -> None:
    """``lstm-export`` a trained version into the repository (written aside, then renamed)."""
    meta = json.loads((MODELS / "meta.json").read_text())
    args = meta["versions"][f"v{version}"]["export_args"]
    staging = repo / f".{model}-{version}"
    staging.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [str(BIN / "lstm-export"), *args, "--out", str(staging / "model.onnx")],
        cwd=MODELS,
        check=True,
        capture_output=True,
    )
    (repo / model).mkdir(exist_ok=True)
    os.replace(staging, repo / model / str(version))


def start_server(repo: Path) -> tuple[subprocess.Popen[str], str]:
    """lstm-serve on free ports; its address once it says where it listens."""
    proc = subprocess.Popen(
        [
            str(BIN / "lstm-serve"),
            *("--model-repository", str(repo), "--model-control", "poll"),
            *("--repository-poll-secs", "0.1", "--port", "0", "--metrics-port", "0"),
            *("--device", "cpu", "--log-level", "WARNING"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    found = re.search(r"gRPC on ([^ ,]+):(\d+)", line)
    if found is None:
        proc.kill()
        raise RuntimeError(f"lstm-serve did not start: {line!r}")
    return proc, f"127.0.0.1:{found.group(2)}"


def wait_ready(client: Client, model: str, version: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for status in client.list_models().versions:
            if (status.model, status.version, status.state) == (model, version, "READY"):
                return
        time.sleep(0.05)
    raise TimeoutError(f"{model} version {version} did not become ready")


def serve(workdir: Path) -> Served:
    """Export, serve and stream; the server's answers."""
    data = np.load(MODELS / "predictions.npz")
    ids = [str(s) for s in data["sessions"]]
    inputs = data["inputs"]  # [24, 51, 1]
    n, years, _ = inputs.shape
    repo = workdir / "repository"
    repo.mkdir(parents=True)
    for model in (MODEL, f"{MODEL}-cli"):
        (repo / model).mkdir()
        (repo / model / "config.pbtxt").write_text(CONFIG % model)
    export(repo, MODEL, 1)
    export(repo, f"{MODEL}-cli", 1)
    export(repo, f"{MODEL}-cli", 2)  # lstm-client's model starts on version 2
    proc, address = start_server(repo)
    try:
        outputs = np.zeros((n, years), np.float32)
        versions = np.zeros((n, years), np.int64)
        switch = years // 2
        with Client(address, model=MODEL) as client:

            def batches():  # type: ignore[no-untyped-def]
                for year in range(years):
                    if year == switch:
                        export(repo, MODEL, 2)  # mid-stream: the server picks it up
                        wait_ready(client, MODEL, 2)
                    yield ids, inputs[:, year]

            for year, results in enumerate(client.stream(batches())):
                if not results.ok:
                    raise RuntimeError(f"year {year}: {set(results.errors) - {''}}")
                outputs[:, year] = results.outputs[:, 0]
                assert results.versions is not None
                versions[:, year] = results.versions
        out = workdir / "cli.jsonl"
        subprocess.run(
            [
                str(BIN / "lstm-client"),
                *("--address", address, "--model", f"{MODEL}-cli"),
                *("stream", str(HERE / "data" / "stream.csv"), "--output", str(out)),
            ],
            check=True,
            capture_output=True,
        )
        cli_outputs = np.zeros((n, years), np.float32)
        cli_versions = np.zeros((n, years), np.int64)
        seen = dict.fromkeys(ids, 0)
        for line in out.read_text().splitlines():
            record = json.loads(line)
            i = ids.index(record["session_id"])
            year = seen[record["session_id"]]
            cli_outputs[i, year] = record["output"][0]
            cli_versions[i, year] = record["model_version"]
            seen[record["session_id"]] += 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return Served(outputs, versions, switch, cli_outputs, cli_versions)


def check(served: Served) -> dict[str, float]:
    """Every forecast against PyTorch's for its version; the largest difference of each."""
    data = np.load(MODELS / "predictions.npz")
    worst = {}
    for version in (1, 2):
        mine = served.versions == version
        want = data[f"v{version}_outputs"][..., 0]
        worst[f"v{version}"] = float(np.abs(served.outputs[mine] - want[mine]).max())
    worst["cli_v2"] = float(np.abs(served.cli_outputs - data["v2_outputs"][..., 0]).max())
    return worst


def draw(served: Served, path: Path) -> None:
    """Forecasts against the truth, one panel per country, coloured by version."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = np.load(MODELS / "predictions.npz")
    mean, std = float(data["mean"]), float(data["std"])
    truth = data["targets"][..., 0] * std + mean
    forecast = served.outputs * std + mean
    years = data["years"] + 1  # each input forecasts the next year
    names = [str(s) for s in data["names"]]
    colours = {1: "#d95f02", 2: "#1b9e77"}
    errors = {v: float(np.abs(forecast - truth)[served.versions == v].mean()) for v in (1, 2)}
    fig, axes = plt.subplots(4, 6, figsize=(16, 9.5), sharex=True)
    for i, ax in enumerate(axes.flat):
        ax.plot(years, truth[i], color="black", linewidth=1.2)
        for v, colour in colours.items():
            mine = served.versions[i] == v
            ax.scatter(years[mine], forecast[i, mine], s=7, color=colour, zorder=3)
        ax.axvline(years[served.switch] - 0.5, color="grey", linestyle=":", linewidth=0.8)
        ax.set_title(names[i], fontsize=9)
        ax.tick_params(labelsize=7)
    handles = [
        plt.Line2D([], [], color="black", label="truth (births per woman)"),
        *(
            plt.Line2D(
                [],
                [],
                color=c,
                marker="o",
                linestyle="",
                label=f"version {v}: mean error {errors[v]:.3f}",
            )
            for v, c in colours.items()
        ),
        plt.Line2D([], [], color="grey", linestyle=":", label="version 2 put into the repository"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=9, frameon=False)
    fig.suptitle(
        "Next year's fertility rate, 24 sessions streamed year by year; version 2 takes over "
        "mid-stream (retire_policy replay)",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0.04, 1, 0.96))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False)
    parser.add_argument(
        "--png", type=Path, default=HERE / "forecast.png", help="the picture (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        served = serve(Path(tmp))
    worst = check(served)
    draw(served, args.png)
    moved = int((served.versions[:, -1] == 2).sum())
    print(
        f"streamed {served.outputs.size} events of {served.outputs.shape[0]} sessions; "
        f"version 2 arrived after {served.switch} of {served.outputs.shape[1]} years and "
        f"answered {int((served.versions == 2).sum())} of them ({moved} sessions moved)"
    )
    print(
        "largest |served - PyTorch|: "
        + ", ".join(f"{name} {value:.2g}" for name, value in worst.items())
    )
    print(f"wrote {args.png} in {time.monotonic() - started:.1f}s")
    if max(worst.values()) > TOLERANCE:
        print("serve.py: served forecasts differ from PyTorch's", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
