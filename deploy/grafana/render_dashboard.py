"""Render the Grafana dashboard's panels into one PNG from a real Prometheus, for the docs.

    python deploy/grafana/render_dashboard.py --prometheus http://localhost:9090 --minutes 15 \
        --out docs/grafana_dashboard.png

Each panel's queries run through Prometheus' query_range API exactly as written in the dashboard JSON,
with Grafana's `$__rate_interval` replaced by --rate-interval and the model selector by --model (a
regular expression; every model by default); the panels keep their places on
Grafana's 24-column grid. Grafana itself is not needed (nor available on the development machine).
"""

import argparse
import json
import math
import re
import time
from pathlib import Path

import httpx
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.axes import Axes

DASHBOARD = Path(__file__).resolve().parent / "dashboards" / "encoder.json"
POINTS_PER_PANEL = 240

# Grafana unit -> (scale, axis label); seconds are shown in milliseconds like the service's headers.
UNITS = {
    "s": (1000.0, "ms"),
    "percentunit": (100.0, "%"),
    "reqps": (1.0, "req/s"),
    "short": (1.0, ""),
    "bytes": (1 / 2**20, "MiB"),
}

Series = tuple[str, list[float], list[float]]  # legend, timestamps, values


def query_range(prometheus: str, expr: str, start: float, end: float, step: float) -> list[dict]:
    response = httpx.get(
        f"{prometheus}/api/v1/query_range",
        params={"query": expr, "start": start, "end": end, "step": step},
        timeout=30.0,
    )
    body = response.json()
    if response.status_code != 200 or body["status"] != "success":
        raise SystemExit(f"Prometheus refused {expr}: {body.get('error', response.text)}")
    return body["data"]["result"]


def legend(template: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda match: labels.get(match.group(1), ""), template).strip()


def panel_series(
    prometheus: str, panel: dict, variables: dict[str, str], start: float, end: float
) -> list[Series]:
    step = max(1.0, (end - start) / POINTS_PER_PANEL)
    series = []
    for target in panel["targets"]:
        expr = target["expr"]
        for name, value in variables.items():
            expr = expr.replace(name, value)
        for result in query_range(prometheus, expr, start, end, step):
            times = [float(timestamp) - end for timestamp, _ in result["values"]]
            values = [float(value) for _, value in result["values"]]
            series.append((legend(target.get("legendFormat", ""), result["metric"]) or expr, times, values))
    return series


def draw_stat(axes: Axes, panel: dict, series: list[Series], scale: float, unit: str) -> None:
    axes.set_axis_off()
    if not series:
        text = "no data"
    elif panel["options"].get("textMode") == "name":
        text = "\n".join(name for name, _, _ in series)
    else:
        last = [value for value in series[0][2] if not math.isnan(value)]
        text = f"{last[-1] * scale:.3g} {unit}" if last else "no data"
    axes.text(0.5, 0.4, text, ha="center", va="center", fontsize=13 if "\n" not in text else 8, wrap=True)


def draw_timeseries(axes: Axes, series: list[Series], scale: float, unit: str) -> None:
    for name, times, values in series:
        axes.plot([t / 60 for t in times], [value * scale for value in values], label=name, linewidth=1.2)
    axes.set_xlabel("minutes ago" if series else "", fontsize=7)
    axes.set_ylabel(unit, fontsize=7)
    axes.tick_params(labelsize=7)
    axes.grid(alpha=0.3)
    axes.set_ylim(bottom=0)
    if series:
        axes.legend(fontsize=6, loc="upper left", ncol=2)
    else:
        axes.text(0.5, 0.5, "no data", ha="center", va="center", transform=axes.transAxes)


def render(prometheus: str, out: Path, minutes: float, variables: dict[str, str]) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    end = time.time()
    start = end - minutes * 60
    rows = max(panel["gridPos"]["y"] + panel["gridPos"]["h"] for panel in dashboard["panels"])
    figure = plt.figure(figsize=(18, rows * 0.45))
    grid = figure.add_gridspec(rows, 24, hspace=0.0, wspace=2.0)
    for panel in dashboard["panels"]:
        x, y, w, h = (panel["gridPos"][key] for key in ("x", "y", "w", "h"))
        # The panel's last grid row is left free for its axis labels and the next panel's title.
        axes = figure.add_subplot(grid[y : y + h - 1, x : x + w])
        axes.set_title(panel["title"], fontsize=9, loc="left")
        scale, unit = UNITS.get(panel["fieldConfig"]["defaults"].get("unit", "short"), (1.0, ""))
        series = panel_series(prometheus, panel, variables, start, end)
        if panel["type"] == "stat":
            draw_stat(axes, panel, series, scale, unit)
        else:
            draw_timeseries(axes, series, scale, unit)
    figure.suptitle(f"{dashboard['title']} (last {minutes:g} min)", fontsize=12)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=90, bbox_inches="tight")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prometheus", default="http://localhost:9090")
    parser.add_argument("--out", type=Path, default=Path("docs/grafana_dashboard.png"))
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--rate-interval", default="20s", help="stands for Grafana's $__rate_interval")
    parser.add_argument("--model", default=".*", help="stands for the dashboard's $model (a regex)")
    args = parser.parse_args()
    variables = {"$__rate_interval": args.rate_interval, "$model": args.model}
    render(args.prometheus.rstrip("/"), args.out, args.minutes, variables)
    print(json.dumps({"out": str(args.out)}))


if __name__ == "__main__":
    main()
