"""Draw the Grafana dashboard's panels from a Prometheus, with matplotlib (no Grafana needed).

``python tools/render_dashboard.py --prometheus http://127.0.0.1:9090 --out dashboard.png``
queries every panel's expressions over the last ``--minutes`` and lays the
panels out as the dashboard does (two columns).
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.parse
import urllib.request
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy/grafana/dashboards/lstm-stream.json"


def query_range(api: str, expr: str, start: float, end: float, step: float) -> list[dict]:
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"{api}/api/v1/query_range?{params}", timeout=30) as response:
        return json.loads(response.read())["data"]["result"]  # type: ignore[no-any-return]


def legend(template: str, labels: dict[str, str]) -> str:
    for key, value in labels.items():
        template = template.replace("{{" + key + "}}", value)
    return template


def render(api: str, out: Path, minutes: float, dashboard: Path = DASHBOARD) -> int:
    """Write the PNG; returns how many series were drawn."""
    panels = json.loads(dashboard.read_text())["panels"]
    end = time.time()
    start = end - minutes * 60
    step = max((end - start) / 200, 1.0)
    rows = (len(panels) + 1) // 2
    fig, axes = plt.subplots(rows, 2, figsize=(14, 2.6 * rows), squeeze=False)
    drawn = 0
    for ax, panel in zip(axes.flat, panels):
        for target in panel["targets"]:
            for series in query_range(api, target["expr"], start, end, step):
                t = [float(v[0]) - end for v in series["values"]]
                y = [float(v[1]) for v in series["values"]]
                ax.plot(t, y, label=legend(target.get("legendFormat", ""), series["metric"]))
                drawn += 1
        ax.set_title(f"{panel['title']} ({panel['fieldConfig']['defaults']['unit']})", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("seconds before now", fontsize=7)
        if ax.lines:
            ax.legend(fontsize=6, loc="upper left")
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    fig.suptitle("lstm-stream (deploy/grafana/dashboards/lstm-stream.json, from Prometheus)")
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return drawn


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False)
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090")
    parser.add_argument("--out", type=Path, default=Path("dashboard.png"))
    parser.add_argument("--minutes", type=float, default=5.0)
    args = parser.parse_args()
    print(f"{render(args.prometheus, args.out, args.minutes)} series drawn into {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
