"""Train the example's forecaster: a country's next fertility rate, an nn.LSTM and a linear head.

Data: the World Bank's total fertility rate (births per woman), 1960-2011, one series
per country, as statsmodels ships it (``statsmodels.datasets.fertility``). 24 large
countries are held out of training; they are the sessions the example streams.

Writes, under ``--out`` (default: this folder):
  models/v1.safetensors, models/v2.safetensors  the two versions' state_dicts
  models/predictions.npz  inputs, targets and PyTorch's own outputs on the streamed countries
  models/meta.json        data, architecture, export arguments, errors
  data/stream.csv         the streamed events as ``lstm-client stream`` reads them

Run it with ``make example-train``: torch lives in its own venv, never in ``.venv``.
"""

from __future__ import annotations

import argparse
import io
import json
import time
import zipfile
from pathlib import Path

import numpy as np
import statsmodels
import torch
from safetensors.torch import save_file
from statsmodels.datasets import fertility
from torch import nn

SEED = 0
FIRST_YEAR, LAST_YEAR = 1960, 2011
# World Bank rows that are groups of countries, not countries.
AGGREGATES = frozenset({"CAA", "LCN", "OED", "OSS", "PSS"})
# Chosen before any training: large countries from every continent, never trained on.
STREAMED = (
    "ARG", "AUS", "BGD", "BRA", "CHN", "DEU", "EGY", "ETH", "FRA", "IDN", "IND", "IRN",
    "ITA", "JPN", "KEN", "KOR", "MEX", "NER", "NGA", "PAK", "RUS", "TUR", "USA", "ZAF",
)  # fmt: skip
HIDDEN, LAYERS = 24, 2
EPOCHS_V1, EPOCHS_V2 = 3, 300  # v2 is the same run as v1, trained on
BATCH, LEARNING_RATE = 16, 0.01
EXPORT_ARGS = ["--rnn", "rnn", "--head", "head"]


class Forecaster(nn.Module):
    """One normalised value per step in, the next step's value out."""

    def __init__(self, hidden: int = HIDDEN, layers: int = LAYERS) -> None:
        super().__init__()
        self.rnn = nn.LSTM(1, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(
        self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        y, state = self.rnn(x, state)
        return self.head(y), state


def load_countries() -> tuple[list[str], list[str], np.ndarray]:
    """Codes, names and rates [N, years] of the countries with every year from 1960 to 2011."""
    frame = fertility.load_pandas().data
    years = [str(y) for y in range(FIRST_YEAR, LAST_YEAR + 1)]
    frame = frame[~frame["Country Code"].isin(AGGREGATES)].dropna(subset=years)
    return (
        frame["Country Code"].tolist(),
        frame["Country Name"].tolist(),
        frame[years].to_numpy(np.float64),
    )


def train(
    model: Forecaster, x: torch.Tensor, y: torch.Tensor, snapshots: tuple[int, ...]
) -> dict[int, dict[str, torch.Tensor]]:
    """Whole-sequence MSE from zero state, seeded minibatches; the state_dict at each snapshot."""
    total = max(snapshots)
    order = torch.Generator().manual_seed(SEED)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    # Decayed to zero over the whole run, so the last epochs settle rather than jump around.
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total)
    saved = {}
    for epoch in range(1, total + 1):
        for batch in torch.randperm(len(x), generator=order).split(BATCH):
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x[batch])[0], y[batch])
            loss.backward()
            optimizer.step()
        schedule.step()
        if epoch in snapshots:
            saved[epoch] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            print(f"epoch {epoch}: last batch's loss {loss.item():.6f}")
    return saved


def error(pred: np.ndarray, target: np.ndarray, std: float) -> dict[str, float]:
    """MSE/MAE of normalised values, and RMSE/MAE in births per woman."""
    diff = pred.astype(np.float64) - target.astype(np.float64)
    return {
        "mse": round(float(np.mean(diff**2)), 7),
        "mae": round(float(np.mean(np.abs(diff))), 6),
        "rmse_births": round(float(np.sqrt(np.mean(diff**2)) * std), 5),
        "mae_births": round(float(np.mean(np.abs(diff)) * std), 5),
    }


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez's layout, but with fixed zip timestamps: a rerun writes the same bytes."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.asarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, buffer.getvalue())


def write_stream_csv(path: Path, sessions: list[str], inputs: np.ndarray) -> None:
    """One ``session_id,value`` line per event, year by year, every country within a year."""
    lines = ["session_id,value"]
    for t in range(inputs.shape[1]):
        # 9 significant digits: the float32 the model was given, read back exactly.
        lines += [f"{s},{float(inputs[i, t, 0]):.9g}" for i, s in enumerate(sessions)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # the same sums in the same order on every machine; the model is tiny

    codes, names, rates = load_countries()
    rows = [codes.index(code) for code in STREAMED]
    trained = np.ones(len(codes), bool)
    trained[rows] = False
    mean, std = float(rates[trained].mean()), float(rates[trained].std())
    series = ((rates - mean) / std).astype(np.float32)[:, :, None]  # [N, years, 1]
    x_train, y_train = torch.from_numpy(series[trained, :-1]), torch.from_numpy(series[trained, 1:])
    inputs, targets = series[rows, :-1], series[rows, 1:]  # the streamed countries: [S, T, 1]
    print(
        f"{len(codes)} countries x {rates.shape[1]} years: {int(trained.sum())} to train on, "
        f"{len(rows)} streamed ({inputs.shape[1]} events each); mean {mean:.4f}, std {std:.4f}"
    )

    model = Forecaster()
    start = time.perf_counter()
    weights = train(model, x_train, y_train, (EPOCHS_V1, EPOCHS_V2))
    print(f"trained {EPOCHS_V2} epochs in {time.perf_counter() - start:.1f} s")

    models, data = args.out / "models", args.out / "data"
    models.mkdir(parents=True, exist_ok=True)
    data.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {
        "sessions": np.array(STREAMED),
        "names": np.array([names[r] for r in rows]),
        "years": np.arange(FIRST_YEAR, LAST_YEAR, dtype=np.int32),  # the year of each input
        "inputs": inputs,
        "targets": targets,  # the next year's value: what each output forecasts
        "mean": np.float64(mean),
        "std": np.float64(std),
    }
    versions: dict[str, dict[str, object]] = {}
    for version, epochs in (("v1", EPOCHS_V1), ("v2", EPOCHS_V2)):
        save_file(weights[epochs], str(models / f"{version}.safetensors"))
        model.load_state_dict(weights[epochs])
        model.eval()
        with torch.no_grad():  # the whole sequence from zero state, as a new session is served
            outputs, (h_n, c_n) = model(torch.from_numpy(inputs))
        arrays[f"{version}_outputs"] = outputs.numpy()
        arrays[f"{version}_h_n"], arrays[f"{version}_c_n"] = h_n.numpy(), c_n.numpy()
        versions[version] = {
            "file": f"{version}.safetensors",
            "epochs": epochs,
            "export_args": ["--from-torch", f"{version}.safetensors", *EXPORT_ARGS],
            "error": error(outputs.numpy(), targets, std),
        }
    baseline = error(inputs, targets, std)  # "next year as this year"
    save_npz(models / "predictions.npz", arrays)
    write_stream_csv(data / "stream.csv", list(STREAMED), inputs)

    meta = {
        "dataset": "World Bank total fertility rate (births per woman), one series per country",
        "package": "statsmodels",
        "package_version": statsmodels.__version__,
        "module": "statsmodels.datasets.fertility",
        "source": "World Development Indicators, SP.DYN.TFRT.IN",
        "years": [FIRST_YEAR, LAST_YEAR],
        "task": "next year's rate from this year's, values normalised as (x - mean) / std",
        "mean": mean,
        "std": std,
        "sessions": list(STREAMED),
        "steps": int(inputs.shape[1]),
        "countries_trained_on": int(trained.sum()),
        "cell": "lstm",
        "event_size": 1,
        "hidden_size": HIDDEN,
        "num_layers": LAYERS,
        "output_size": 1,
        "rnn_module": "rnn",
        "head": "head",
        "output_activation": "none",
        "torch": torch.__version__,
        "seed": SEED,
        "versions": versions,
        "error_of_repeating_the_last_value": baseline,
    }
    (models / "meta.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    for version, info in versions.items():
        print(f"{version} ({info['epochs']} epochs): {info['error']}")
    print(f"repeating the last value: {baseline}")


if __name__ == "__main__":
    main()
