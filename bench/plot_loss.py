"""Plot the training loss of one or more RUN directories from their metrics.jsonl.

.venv/bin/python bench/plot_loss.py runs/q1/pretrain --out docs/loss_curve.png
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and in CI
import matplotlib.pyplot as plt


def read_metrics(run: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def moving_average(values: list[float], window: int) -> list[float]:
    averaged = []
    for index in range(len(values)):
        recent = values[max(0, index - window + 1) : index + 1]
        averaged.append(sum(recent) / len(recent))
    return averaged


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", type=Path, help="RUN directories with metrics.jsonl")
    parser.add_argument("--out", type=Path, default=Path("docs/loss_curve.png"))
    parser.add_argument("--window", type=int, default=10, help="moving-average window in steps")
    args = parser.parse_args()
    figure, loss_axis = plt.subplots(figsize=(8, 4.5), dpi=120)
    for run in args.runs:
        records = read_metrics(run)
        steps = [r["step"] for r in records]
        losses = [r["loss"] for r in records]
        loss_axis.plot(steps, losses, alpha=0.25, linewidth=0.8)
        loss_axis.plot(steps, moving_average(losses, args.window), label=f"{run} (mean of {args.window})")
    loss_axis.set_xlabel("optimizer step")
    loss_axis.set_ylabel("training loss")
    loss_axis.grid(alpha=0.3)
    loss_axis.legend()
    records = read_metrics(args.runs[0])
    if "lr" in records[0]:
        lr_axis = loss_axis.twinx()
        lr_axis.plot([r["step"] for r in records], [r["lr"] for r in records], color="gray", linestyle=":")
        lr_axis.set_ylabel("learning rate (dotted)")
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out)
    print(json.dumps({"plot": str(args.out), "runs": [str(run) for run in args.runs]}))


if __name__ == "__main__":
    main()
