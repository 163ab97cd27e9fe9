"""Collect `pipelines/quality.sh`'s evaluations into benchmarks/results/quality-cpu.json and a markdown table.

Each run folder ``<work>/<arm>-s<seed>`` holds the training run (``runs/*/ckpt-*.pt``), its evaluation (``eval/``)
and the evaluation of its class-confidence-filtered export (``eval-filtered/``). Per arm, a figure is the mean over
the training seeds, with the spread (the standard deviation over training seeds when there are several, else the
standard deviation over the evaluation's classifier seeds, marked "cls").

Usage:
    python benchmarks/quality.py --work WORK/quality --minutes 45 --out-json benchmarks/results/quality-cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import re
from pathlib import Path

import numpy as np

ARMS = ("before", "after")
# (label, metric key, digits, spread key from the classifier seeds or None)
ROWS = [
    ("kimg reached in the budget", "kimg", 1, None),
    ("img/s", "img_per_s", 1, None),
    ("FD on domain features (real floor {fd_real_floor:.2f})", "fd", 2, None),
    ("KID x1000", "kid_x1000", 0, None),
    ("precision", "precision", 2, None),
    ("recall", "recall", 2, None),
    ("coverage", "coverage", 2, None),
    ("class fidelity", "class_fidelity", 3, None),
    ("  glioma", "class_fidelity.glioma", 2, None),
    ("  meningioma", "class_fidelity.meningioma", 2, None),
    ("  notumor", "class_fidelity.notumor", 2, None),
    ("  pituitary", "class_fidelity.pituitary", 2, None),
    ("TSTR balanced accuracy", "tstr_balanced_accuracy", 3, "tstr_balanced_accuracy_std"),
    ("TRTR balanced accuracy", "trtr_balanced_accuracy", 3, "trtr_balanced_accuracy_std"),
    ("TSTR / TRTR balanced accuracy", "tstr_trtr_ratio", 3, "tstr_trtr_ratio_std"),
    ("TSTR macro AUC", "tstr_macro_auc", 3, "tstr_macro_auc_std"),
    ("TRTR macro AUC", "trtr_macro_auc", 3, "trtr_macro_auc_std"),
    ("TSTR / TRTR macro AUC", "tstr_trtr_auc_ratio", 3, "tstr_trtr_auc_ratio_std"),
    ("real + synthetic balanced accuracy", "mixed_balanced_accuracy", 3, "mixed_balanced_accuracy_std"),
    ("real + synthetic minus real alone", "mixed_trtr_delta", 3, "mixed_trtr_delta_std"),
    (
        "TSTR / TRTR, filtered export (P >= {confidence:g})",
        "filtered.tstr_trtr_ratio",
        3,
        "filtered.tstr_trtr_ratio_std",
    ),
    ("class fidelity, filtered export", "filtered.class_fidelity", 3, None),
    ("near-copy fraction (pixel space)", "near_copy_fraction", 3, None),
    ("within-class MS-SSIM (real {ms_ssim_real:.2f})", "ms_ssim_synthetic", 3, None),
]


def read_run(folder: Path, minutes: float) -> dict | None:
    ev = folder / "eval" / "metrics.json"
    if not ev.is_file():
        return None
    m = dict(json.loads(ev.read_text())["metrics"])
    ckpts = sorted(folder.glob("runs/*/ckpt-*.pt"))
    images = int(re.search(r"ckpt-(\d+)", ckpts[-1].name).group(1)) if ckpts else 0
    m["kimg"] = images / 1000
    m["img_per_s"] = images / (minutes * 60)
    filt = folder / "eval-filtered" / "metrics.json"
    if filt.is_file():
        f = json.loads(filt.read_text())["metrics"]
        m.update({f"filtered.{k}": v for k, v in f.items()})
    return m


def summarize(runs: list[dict], key: str, spread_key: str | None) -> dict | None:
    vals = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
    if not vals:
        return None
    out = {"mean": float(np.mean(vals)), "n": len(vals), "values": vals}
    if len(vals) > 1:
        out["spread"], out["spread_over"] = float(np.std(vals, ddof=1)), "training seeds"
    elif spread_key and isinstance(runs[0].get(spread_key), (int, float)):
        out["spread"], out["spread_over"] = float(runs[0][spread_key]), "classifier seeds"
    return out


def cell(s: dict | None, digits: int) -> str:
    if s is None:
        return "not measured"
    text = f"{s['mean']:.{digits}f}"
    if "spread" in s:
        text += f" ± {s['spread']:.{digits}f}" + (" (cls)" if s["spread_over"] == "classifier seeds" else "")
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--minutes", type=float, required=True)
    ap.add_argument("--baseline-rev", default="")
    ap.add_argument("--confidence", type=float, default=0.9)
    ap.add_argument("--out-json", type=Path)
    args = ap.parse_args()

    per_arm: dict[str, dict[str, dict]] = {arm: {} for arm in ARMS}
    for folder in sorted(args.work.glob("*-s*")):
        arm, _, seed = folder.name.rpartition("-s")
        run = read_run(folder, args.minutes) if arm in per_arm else None
        if run is not None:
            per_arm[arm][seed] = run
    fmt = {"confidence": args.confidence}
    for arm in ARMS:
        for run in per_arm[arm].values():
            fmt.setdefault("fd_real_floor", run.get("fd_real_floor", float("nan")))
            fmt.setdefault("ms_ssim_real", run.get("ms_ssim_real", float("nan")))
    table = {arm: {key: summarize(list(per_arm[arm].values()), key, sk) for _, key, _, sk in ROWS} for arm in ARMS}

    seeds = {arm: sorted(per_arm[arm]) for arm in ARMS}
    lines = [
        f"| metric | before ({args.baseline_rev or 'baseline'}; seeds {', '.join(seeds['before']) or '-'}) "
        f"| after (seeds {', '.join(seeds['after']) or '-'}) |",
        "|---|---|---|",
    ]
    for label, key, digits, _ in ROWS:
        lines.append(
            f"| {label.format(**fmt)} | {cell(table['before'][key], digits)} | {cell(table['after'][key], digits)} |"
        )
    print("\n".join(lines))

    if args.out_json:
        results = {
            "machine": f"{platform.machine()} CPU, 2 cores (one thread per run, two runs side by side)",
            "budget_minutes": args.minutes,
            "baseline_rev": args.baseline_rev,
            "min_class_confidence": args.confidence,
            "runs": per_arm,
            "summary": table,
        }
        args.out_json.parent.mkdir(parents=True, exist_ok=True)
        args.out_json.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
