"""Summarise the discriminator experiment (pipelines/ablation.sh): a table per arm over seeds, a figure, a JSON record.

Runs are read from their MLflow experiment and grouped into arms by the settings the experiment varies (batch size,
D's 1x1 reduction, spectral norm/augmentation/R1). Per arm, over seeds (mean and standard deviation): D loss, D accuracy
on real and fake, mean D(real) and D(fake), G loss, all over the last quarter of training; the lowest D loss and the
highest G loss seen; in how many log intervals and in how many runs the overpowering alarm fired; G steps taken. With
``--reports`` (folders written by ``medgan evaluate``, one per run, named after it) FD, class fidelity and TSTR/TRTR
join.

The figure has one panel per arm: D loss (log scale), D accuracy (min of real and fake) and G loss against kimg, one
line per seed.

Example:
    python scripts/ablation_report.py --experiment medgan-ablation-brain_mri_16pc --reports reports/ablation \
        --out-md docs/ablation.md --out-png docs/ablation.png --out-json benchmarks/results/ablation-cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from pathlib import Path

KEYS = ("loss/d", "loss/g", "d/acc_real", "d/acc_fake", "d/prob_real", "d/prob_fake", "alarm/d_overpowering")
QUALITY = (("fd", "FD"), ("fd_real_floor", "FD real floor"), ("class_fidelity", "class fidelity"),
           ("tstr_trtr_ratio", "TSTR/TRTR"))  # fmt: skip
ARM_ORDER = ("b4-unreduced", "b4-reduced32", "b32-unreduced", "b32-reduced32", "b32-reduced16", "b4-unreduced-default")


def arm_of(params: dict[str, str]) -> str:
    """The arm a run belongs to, from the settings the experiment varies."""
    red = params.get("model.d_reduce_channels", "None")
    reduction = "unreduced" if red in ("None", "none", "") else f"reduced{red}"
    name = f"b{params.get('train.batch_size', '?')}-{reduction}"
    product = params.get("model.spectral_norm") == "True" or params.get("train.augment", "none") != "none"
    return name + ("-default" if product else "")


def _tail(values: list[float]) -> float:
    tail = values[-max(1, len(values) // 4) :]
    return sum(tail) / len(tail)


def _find(metrics: dict, key: str) -> float | None:
    """A numeric metric from a report's metrics.json, searched through its sections; None if absent or not a number."""
    stack = [metrics]
    while stack:
        d = stack.pop()
        for k, v in d.items():
            if isinstance(v, dict):
                stack.append(v)
            elif k == key and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                return float(v)
    return None


def _stats(values: list[float | None]) -> dict[str, float | int] | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}


def _fmt(s: dict | None, digits: int = 3) -> str:
    if s is None:
        return "not measured"
    return f"{s['mean']:.{digits}g} ± {s['std']:.{max(1, digits - 1)}g}"


def load_runs(uri: str, experiment: str) -> list[dict]:
    """Finished runs of the experiment with params and metric histories, oldest first."""
    from medgan.tracking.store import experiment_runs, resolve_uri

    try:
        runs = experiment_runs(resolve_uri(uri), experiment, KEYS)
    except ValueError as e:
        raise SystemExit(f"ablation_report: {e}") from None
    return [r for r in runs if r["status"] == "FINISHED"]


def summarise(runs: list[dict], reports: Path | None) -> dict[str, dict]:
    """Per arm: the settings, per-seed figures and their mean/std over seeds."""
    arms: dict[str, list[dict]] = {}
    for r in runs:
        h, p = r["history"], r["params"]
        if not h["loss/d"]:
            continue
        seed_row = {
            "run": r["run_name"],
            "seed": int(p.get("train.seed", "0")),
            "kimg": h["loss/d"][-1][0] / 1000,
            "g_steps": h["loss/d"][-1][0] // int(p["train.batch_size"]),
            "d_loss_tail": _tail([v for _, v in h["loss/d"]]),
            "d_loss_min": min(v for _, v in h["loss/d"]),
            "d_acc_real_tail": _tail([v for _, v in h["d/acc_real"]]),
            "d_acc_fake_tail": _tail([v for _, v in h["d/acc_fake"]]),
            "d_real_tail": _tail([v for _, v in h["d/prob_real"]]),
            "d_fake_tail": _tail([v for _, v in h["d/prob_fake"]]),
            "g_loss_tail": _tail([v for _, v in h["loss/g"]]),
            "g_loss_max": max(v for _, v in h["loss/g"]),
            "alarm_intervals": sum(v > 0 for _, v in h["alarm/d_overpowering"]),
            "log_intervals": len(h["alarm/d_overpowering"]),
            "history": {k: [[s / 1000, v] for s, v in h[k]] for k in ("loss/d", "loss/g", "d/acc_real", "d/acc_fake")},
        }
        metrics = {}
        if reports is not None and (reports / r["run_name"] / "metrics.json").is_file():
            metrics = json.loads((reports / r["run_name"] / "metrics.json").read_text())
        for key, _ in QUALITY:
            seed_row[key] = _find(metrics, key)
        arms.setdefault(arm_of(p), []).append(seed_row)
    summary = {}
    for arm in sorted(arms, key=lambda a: ARM_ORDER.index(a) if a in ARM_ORDER else len(ARM_ORDER)):
        rows = sorted(arms[arm], key=lambda s: s["seed"])
        numeric = [k for k in rows[0] if k not in ("run", "seed", "history")]
        summary[arm] = {
            "seeds": rows,
            "stats": {k: _stats([s[k] for s in rows]) for k in numeric},
            "runs_alarmed": sum(s["alarm_intervals"] > 0 for s in rows),
        }
    return summary


def markdown(summary: dict[str, dict], reports: bool) -> str:
    header = ["arm", "seeds", "kimg", "G steps", "D loss (last 1/4)", "min D loss", "D acc real", "D acc fake",
              "D(real)", "D(fake)", "G loss (last 1/4)", "max G loss", "alarm intervals", "runs alarmed"]  # fmt: skip
    if reports:
        header += [label for _, label in QUALITY]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm, a in summary.items():
        s, n = a["stats"], len(a["seeds"])
        row = [arm, str(n), f"{s['kimg']['mean']:.2f}", f"{s['g_steps']['mean']:.0f}", _fmt(s["d_loss_tail"]),
               _fmt(s["d_loss_min"]), _fmt(s["d_acc_real_tail"], 2), _fmt(s["d_acc_fake_tail"], 2),
               _fmt(s["d_real_tail"], 2), _fmt(s["d_fake_tail"], 2), _fmt(s["g_loss_tail"]), _fmt(s["g_loss_max"]),
               f"{s['alarm_intervals']['mean']:.1f} of {s['log_intervals']['mean']:.0f}",
               f"{a['runs_alarmed']} of {n}"]  # fmt: skip
        if reports:
            row += [_fmt(s[key]) for key, _ in QUALITY]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def figure(summary: dict[str, dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(summary)
    fig, axes = plt.subplots(3, n, figsize=(3.2 * n, 7.5), sharex=True, squeeze=False)
    colors = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")
    for j, (arm, a) in enumerate(summary.items()):
        for i, s in enumerate(a["seeds"]):
            h, c = s["history"], colors[i % len(colors)]
            kimg = [k for k, _ in h["loss/d"]]
            axes[0, j].semilogy(kimg, [max(v, 1e-6) for _, v in h["loss/d"]], color=c, label=f"seed {s['seed']}")
            acc = [min(r, f) for (_, r), (_, f) in zip(h["d/acc_real"], h["d/acc_fake"], strict=True)]
            axes[1, j].plot(kimg, acc, color=c)
            axes[2, j].plot([k for k, _ in h["loss/g"]], [v for _, v in h["loss/g"]], color=c)
        axes[0, j].set_title(arm, fontsize=9)
        axes[0, j].axhline(1e-3, color="grey", lw=0.6, ls="--")
        axes[1, j].set_ylim(0, 1.02)
        axes[1, j].axhline(0.99, color="grey", lw=0.6, ls="--")
        axes[2, j].set_xlabel("kimg")
    axes[0, 0].set_ylabel("D loss (log)")
    axes[1, 0].set_ylabel("D accuracy, min(real, fake)")
    axes[2, 0].set_ylabel("G loss")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("Discriminator experiment: dashed lines are the overpowering alarm's thresholds", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"))
    ap.add_argument("--experiment", required=True)
    ap.add_argument("--reports", type=Path, default=None, help="folder with <run name>/metrics.json per run")
    ap.add_argument("--out-md", type=Path, default=None, help="write the table here (it is always printed)")
    ap.add_argument("--out-png", type=Path, default=None, help="write the figure here")
    ap.add_argument("--out-json", type=Path, default=None, help="write every per-seed figure here")
    args = ap.parse_args()
    summary = summarise(load_runs(args.tracking_uri, args.experiment), args.reports)
    if not summary:
        raise SystemExit(f"ablation_report: experiment {args.experiment!r} has no finished runs with metrics")
    table = markdown(summary, args.reports is not None)
    print(table)
    if args.out_md:
        args.out_md.parent.mkdir(parents=True, exist_ok=True)
        args.out_md.write_text(table)
    if args.out_png:
        print(f"figure: {figure(summary, args.out_png)}")
    if args.out_json:
        args.out_json.parent.mkdir(parents=True, exist_ok=True)
        record = {"experiment": args.experiment, "arms": summary}
        args.out_json.write_text(json.dumps(record, indent=1, default=float) + "\n")


if __name__ == "__main__":
    main()
