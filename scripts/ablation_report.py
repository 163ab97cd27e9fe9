"""Summarise the discriminator ablation (pipelines/ablation.sh) from its MLflow experiment as a Markdown table.

For each run: batch size, D channel reduction, the D loss and D accuracy over the last quarter of training and their
extremes, how many log intervals raised the overpowering alarm, and the generator loss. With ``--reports`` (folders
written by ``medgan evaluate`` on each run's checkpoint, named after the run) the quality metrics join the table.

Example:
    python scripts/ablation_report.py --tracking-uri sqlite:///$PWD/mlflow.db --experiment medgan-ablation-brain_mri
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from medgan.tracking.store import experiment_runs, resolve_uri

KEYS = ("loss/d", "loss/g", "d/acc_real", "d/acc_fake", "alarm/d_overpowering")
QUALITY = (("fd", "FD_domain"), ("class_fidelity", "class fidelity"), ("tstr_trtr_ratio", "TSTR/TRTR"),
           ("near_copy_fraction", "near copies"), ("ms_ssim_synthetic", "MS-SSIM"))  # fmt: skip


def _tail_mean(history: list[tuple[int, float]]) -> float:
    values = [v for _, v in history]
    tail = values[-max(1, len(values) // 4) :]
    return sum(tail) / len(tail) if tail else float("nan")


def _find(metrics: dict, key: str) -> float | None:
    """A metric from a report's metrics.json, searched by key suffix (reports nest their sections)."""
    stack = [metrics]
    while stack:
        d = stack.pop()
        for k, v in d.items():
            if isinstance(v, dict):
                stack.append(v)
            elif k == key and isinstance(v, (int, float)):
                return float(v)
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", ""))
    ap.add_argument("--experiment", required=True)
    ap.add_argument("--reports", type=Path, default=None, help="folder with <run name>/metrics.json per run")
    args = ap.parse_args()
    runs = experiment_runs(resolve_uri(args.tracking_uri), args.experiment, KEYS)
    header = ["run", "batch", "D reduce", "D loss (last 1/4)", "min D loss", "D acc real/fake (last 1/4)",
              "overpowering alarms", "G loss (last 1/4)"]  # fmt: skip
    if args.reports:
        header += [label for _, label in QUALITY]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in runs:
        h, p = r["history"], r["params"]
        row = [
            r["run_name"],
            p.get("train.batch_size", "?"),
            p.get("model.d_reduce_channels", "?"),
            f"{_tail_mean(h['loss/d']):.3g}",
            f"{min((v for _, v in h['loss/d']), default=float('nan')):.3g}",
            f"{_tail_mean(h['d/acc_real']):.2f} / {_tail_mean(h['d/acc_fake']):.2f}",
            f"{sum(v > 0 for _, v in h['alarm/d_overpowering'])} of {len(h['alarm/d_overpowering'])}",
            f"{_tail_mean(h['loss/g']):.3g}",
        ]
        if args.reports:
            path = args.reports / r["run_name"] / "metrics.json"
            metrics = json.loads(path.read_text()) if path.is_file() else {}
            row += [f"{v:.3g}" if (v := _find(metrics, key)) is not None else "-" for key, _ in QUALITY]
        print("| " + " | ".join(str(c) for c in row) + " |")


if __name__ == "__main__":
    main()
