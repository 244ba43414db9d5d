"""examples/fertility end to end, as `make example` runs it: the trained PyTorch model's
two versions exported, served, streamed, upgraded mid-stream; the served forecasts are
PyTorch's own."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "fertility" / "serve.py"


def load_example():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("fertility_serve", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_served_forecasts_are_pytorchs_and_version_2_takes_over_mid_stream(
    tmp_path: Path,
) -> None:
    example = load_example()
    served = example.serve(tmp_path)  # raises on any refused event
    worst = example.check(served)
    assert max(worst.values()) <= 1e-5, worst
    versions = served.versions
    assert (versions[:, : served.switch] == 1).all()  # before version 2 was put in
    assert (versions[:, -1] == 2).all()  # every session moved over
    assert (np.diff(versions, axis=1) >= 0).all()  # and never back
    assert 0 < served.switch < versions.shape[1] - 1
    assert (served.cli_versions == 2).all()  # lstm-client's model started on version 2
    example.draw(served, tmp_path / "forecast.png")
    assert (tmp_path / "forecast.png").stat().st_size > 50_000
