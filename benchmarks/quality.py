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
    ("img/s (kimg reached / budget)", "img_per_s", 1, None),
    ("FD on domain features (real floor {fd_real_floor})", "fd", 2, None),
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
    ("within-class MS-SSIM (real {ms_ssim_real})", "ms_ssim_synthetic", 3, None),
]


def cpu_model() -> str:
    """The CPU's model name and whether it has AVX512-BF16: bf16 autocast's speed on the CPU depends on both."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = re.search(r"^model name\s*:\s*(.+)$", info, re.M)
    bf16 = ", AVX512-BF16" if re.search(r"\bavx512_bf16\b", info) else ""
    return f"{name.group(1).strip() if name else platform.machine()}{bf16}"


def read_run(folder: Path, minutes: float) -> dict | None:
    ev = folder / "eval" / "metrics.json"
    if not ev.is_file():
        return None
    m = dict(json.loads(ev.read_text())["metrics"])
    marker = folder / "checkpoint"  # pipelines/quality.sh: the run's last checkpoint
    ckpts = [Path(marker.read_text().strip())] if marker.is_file() else sorted(folder.glob("runs/*/ckpt-*.pt"))
    images = int(re.search(r"ckpt-(\d+)", ckpts[-1].name).group(1)) if ckpts else 0
    m["kimg"] = images / 1000
    m["img_per_s"] = images / (minutes * 60)
    export = folder / "filtered" / "dataset.json"
    if export.is_file():
        flt = json.loads(export.read_text())["export"].get("class_confidence_filter") or {}
        for c, v in flt.get("per_class", {}).items():
            m[f"filtered.acceptance.{c}"] = v["acceptance_rate"]
    filt = folder / "eval-filtered" / "metrics.json"
    if filt.is_file():
        f = json.loads(filt.read_text())["metrics"]
        m.update({f"filtered.{k}": v for k, v in f.items()})
    return m


SCREEN_KEYS = (
    "fd",
    "precision",
    "recall",
    "class_fidelity",
    "tstr_trtr_ratio",
    "tstr_trtr_auc_ratio",
    "ms_ssim_synthetic",
)


def read_screens(folder: Path) -> list[dict]:
    """Short screening runs: ``<folder>/runs/<name>/*/ckpt-*.pt`` (the last one evaluated into
    ``<folder>/reports/<name>/metrics.json``); the settings that differ are read from the checkpoint's config."""
    from medgan import checkpoint

    out = []
    for report in sorted(folder.glob("reports/*/metrics.json")):
        name = report.parent.name
        ckpts = sorted(folder.glob(f"runs/{name}/*/ckpt-*.pt"))
        if not ckpts:
            continue
        ckpt = ckpts[-1]
        cfg = checkpoint.load(ckpt)["config"]
        m = json.loads(report.read_text())["metrics"]
        out.append(
            {
                "name": name,
                "batch_size": cfg["train"]["batch_size"],
                "augment": cfg["train"]["augment"],
                "g_blocks": cfg["model"].get("g_blocks", "plain"),
                "kimg": int(re.search(r"ckpt-(\d+)", ckpt.name).group(1)) / 1000,
                **{k: m.get(k) for k in SCREEN_KEYS},
            }
        )
    return out


def cue_stats(images: np.ndarray) -> dict:
    """Low-level statistics a discriminator could separate real from synthetic by, without looking at anatomy.

    ``exact_black``: pixels exactly -1 (ingest clips the background there; tanh never reaches it). ``pair_ratio``:
    mean |horizontal step| inside pixel pairs (0-1, 2-3, ...) over that across pairs (1-2, 3-4, ...): below 1 when
    images were upsampled by 2 somewhere. ``phase8``: the mean |step| at each phase of an 8-pixel grid, normalised
    (JPEG's 8x8 blocks of a 256- or 512-pixel source land every 4 or 2 pixels at 128).
    """
    x = images.astype(np.float32).reshape(len(images), -1, images.shape[-1])
    d = np.abs(np.diff(x, axis=-1)).mean(axis=(0, 1))
    phase = np.array([d[k::8].mean() for k in range(8)])
    return {
        "exact_black": float((x == -1).mean()),
        "below_-0.9": float((x < -0.9).mean()),
        "pair_ratio": float(d[0::2].mean() / d[1::2].mean()),
        "phase8": [round(float(v), 3) for v in phase / phase.mean()],
    }


def read_cues(dataset: Path, checkpoint: Path, n_per_class: int = 64) -> dict:
    from medgan.dataset import SliceDataset
    from medgan.models.generator import generate
    from medgan.tracking.registry import load_generator

    ds = SliceDataset.open(dataset)
    train = ds.indices("train")
    real = np.asarray(ds.images[np.sort(train[np.linspace(0, len(train) - 1, 4 * n_per_class).astype(int)])])
    loaded = load_generator(str(checkpoint))
    nc = len(loaded.classes)
    fake = generate(loaded.G, np.repeat(np.arange(nc), n_per_class), np.tile(np.arange(n_per_class), nc))
    return {"checkpoint": checkpoint.name, "real": cue_stats(real), "synthetic": cue_stats(fake)}


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
    ap.add_argument("--screens", type=Path, help="a folder of short screening runs to record beside the comparison")
    ap.add_argument("--cues", type=Path, help="the real dataset: low-level real/synthetic cues of the after arm's run")
    ap.add_argument("--before-set", default="", help="the before arm's extra --set overrides (quality.sh BEFORE_SET)")
    ap.add_argument("--after-set", default="", help="the after arm's extra --set overrides (quality.sh AFTER_SET)")
    ap.add_argument("--out-json", type=Path)
    args = ap.parse_args()

    per_arm: dict[str, dict[str, dict]] = {arm: {} for arm in ARMS}
    for folder in sorted(args.work.glob("*-s*")):
        arm, _, seed = folder.name.rpartition("-s")
        run = read_run(folder, args.minutes) if arm in per_arm else None
        if run is not None:
            per_arm[arm][seed] = run
    fmt = {"confidence": args.confidence, "fd_real_floor": "not measured", "ms_ssim_real": "not measured"}
    for arm in ARMS:
        for run in per_arm[arm].values():
            for k in ("fd_real_floor", "ms_ssim_real"):
                if isinstance(run.get(k), (int, float)):
                    fmt[k] = f"{run[k]:.2f}"
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
    screens = read_screens(args.screens) if args.screens else []
    if screens:
        print("\n| screen | batch | augment | G blocks | kimg | " + " | ".join(SCREEN_KEYS) + " |")
        print("|---" * (5 + len(SCREEN_KEYS)) + "|")
        for r in screens:
            vals = " | ".join(f"{r[k]:.3f}" if isinstance(r[k], float) else "-" for k in SCREEN_KEYS)
            print(f"| {r['name']} | {r['batch_size']} | {r['augment']} | {r['g_blocks']} | {r['kimg']:.1f} | {vals} |")

    if args.out_json:
        results = {
            "machine": f"{cpu_model()}, 2 cores (one thread per run, two runs side by side)",
            "budget_minutes": args.minutes,
            "baseline_rev": args.baseline_rev,
            "overrides": {"before": args.before_set.split(), "after": args.after_set.split()},
            "min_class_confidence": args.confidence,
            "runs": per_arm,
            "summary": table,
        }
        if screens:
            results["screens"] = screens
        after = sorted(args.work.glob("after-s*/runs/*/ckpt-*.pt"))  # one run folder per seed
        if args.cues and after:
            results["cues"] = read_cues(args.cues, after[-1])
            print("\nlow-level cues (real vs synthetic):", json.dumps(results["cues"]))
        args.out_json.parent.mkdir(parents=True, exist_ok=True)
        args.out_json.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
