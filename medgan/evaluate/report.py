"""The evaluation report folder: ``metrics.json``, ``report.md`` and figures, written atomically.

``metrics.json`` holds the flat metrics (what MLflow logs), the gates, the sample counts and the details (per-class
values, domain-network provenance, the closest pairs); ``report.md`` is the same as tables a reviewer can read;
``samples.png`` shows synthetic next to real images per class; ``nearest_pairs.png`` shows the synthetic images closest
to a training image next to that image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medgan.evaluate.gates import NOT_MEASURABLE, describe_value
from medgan.io import atomic_write_json, atomic_write_text
from medgan.viz import image_grid, save_png

# (metric, synthetic key, real floor key, how to read it, count key)
TABLE: list[tuple[str, str, str | None, str, str]] = [
    (
        "Frechet distance (domain features)",
        "fd",
        "fd_real_floor",
        "lower is better; floor = real held-out vs train",
        "n_eval",
    ),
    (
        "KID (x1000)",
        "kid_x1000",
        "kid_real_floor_x1000",
        "lower is better; unbiased, ~0 for matching sets",
        "kid_subset_size",
    ),
    ("Precision (k=3)", "precision", "precision_real_floor", "fidelity: fakes inside the real manifold", "n_eval"),
    ("Recall (k=3)", "recall", "recall_real_floor", "coverage: reals inside the fake manifold", "n_eval"),
    ("Density (k=5)", "density", "density_real_floor", "~1 for matching sets", "n_eval"),
    ("Coverage (k=5)", "coverage", "coverage_real_floor", "fraction of reals with a fake nearby", "n_eval"),
    (
        "Class fidelity",
        "class_fidelity",
        "domain_test_accuracy",
        "domain classifier recognises the asked class; reference: its real test accuracy",
        "n_synthetic",
    ),
    (
        "Within-class MS-SSIM",
        "ms_ssim_synthetic",
        "ms_ssim_real",
        "lower = more diverse; near 1 = collapse",
        "ms_ssim_pairs",
    ),
    (
        "Near-copy fraction (pixel)",
        "near_copy_fraction",
        "near_copy_fraction_real",
        "NN-to-train < ratio x median test NN; reference: real val (else test) images",
        "n_synthetic",
    ),
    (
        "Near-copy fraction (features)",
        "near_copy_fraction_features",
        None,
        "same test in domain-feature space",
        "n_synthetic",
    ),
    (
        "NN distance ratio (pixel)",
        "nn_distance_ratio",
        None,
        "median synthetic / median test NN-to-train; < 1 = closer",
        "n_test",
    ),
]


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else "not measurable"
    return str(v)


def _spread(m: dict[str, float], not_measurable: dict[str, str], key: str) -> str:
    # "mean ± std" over classifier seeds, or the reason it is not measurable.
    text = describe_value(key, m, not_measurable)
    return f"{text} ± {m[key + '_std']:.2g}" if key in m and f"{key}_std" in m else text


def _utility_table(m: dict[str, float], not_measurable: dict[str, str]) -> list[str]:
    lines = [
        "| trained on -> tested on real test | accuracy | balanced accuracy | macro AUC | n train | n test |",
        "|---|---|---|---|---|---|",
    ]
    n_syn, n_train = int(m["n_synthetic"]), int(m["n_train"])
    for label, who, n in (
        ("synthetic (TSTR)", "tstr", n_syn),
        ("real train (TRTR)", "trtr", n_train),
        ("real train + synthetic", "mixed", n_train + n_syn),
    ):
        cells = " | ".join(
            _spread(m, not_measurable, f"{who}_{what}") for what in ("accuracy", "balanced_accuracy", "macro_auc")
        )
        lines.append(f"| {label} | {cells} | {n} | {int(m['n_test'])} |")
    return [
        *lines,
        "",
        f"TSTR/TRTR balanced-accuracy ratio: **{_spread(m, not_measurable, 'tstr_trtr_ratio')}**; macro AUC ratio: "
        f"**{_spread(m, not_measurable, 'tstr_trtr_auc_ratio')}**. Adding the synthetic images to the real train "
        f"split changes balanced accuracy by **{_spread(m, not_measurable, 'mixed_trtr_delta')}** and macro AUC by "
        f"**{_spread(m, not_measurable, 'mixed_trtr_auc_delta')}** (paired by seed; > 0: synthetic data helps).",
        "",
    ]


def sample_figure(
    synthetic: np.ndarray,
    synthetic_labels: np.ndarray,
    real: np.ndarray,
    real_labels: np.ndarray,
    num_classes: int,
    per_class: int = 8,
) -> np.ndarray:
    """One row per class: `per_class` synthetic images, then `per_class` real train images, evenly spaced (uint8)."""
    tiles = []
    blank = np.full((1, *synthetic.shape[1:]), -1.0, dtype=np.float32)
    for c in range(num_classes):
        for images, labels in ((synthetic, synthetic_labels), (real, real_labels)):
            idx = np.flatnonzero(labels == c)
            # Evenly spaced through the class, not the first rows (neighbouring rows are often one volume's slices).
            idx = idx[np.unique(np.linspace(0, len(idx) - 1, per_class).astype(int))] if len(idx) else idx
            chosen = np.asarray(images[idx], dtype=np.float32)
            pad = [blank] * (per_class - len(chosen))
            tiles.append(np.concatenate([chosen, *pad]) if pad else chosen)
    return image_grid(np.concatenate(tiles), ncol=2 * per_class)


def pairs_figure(
    synthetic: np.ndarray, train: np.ndarray, pairs: Sequence[tuple[int, int]], per_row: int = 4
) -> np.ndarray:
    """Closest pairs side by side: (synthetic, nearest train image), `per_row` pairs per row (uint8 grid)."""
    tiles = [np.asarray(x, dtype=np.float32) for s, t in pairs for x in (synthetic[s], train[t])]
    return image_grid(np.stack(tiles), ncol=2 * per_row)


def markdown(
    title: str, metrics: dict[str, float], not_measurable: dict[str, str], gates: list[Any], details: dict[str, Any]
) -> str:
    """The human-readable report: headline table with counts, utility, per-class values, gates."""
    m = metrics

    def v(key: str | None) -> str:
        return describe_value(key, m, not_measurable) if key else "-"

    lines = [f"# {title}", ""]
    lines += [
        f"Synthetic images: {int(m['n_synthetic'])} ({details['n_per_class_text']}); real train {int(m['n_train'])}, "
        f"val {int(m['n_val'])}, test {int(m['n_test'])}. Distribution metrics use "
        f"{int(m['n_eval'])} samples per side (synthetic vs a train subsample; the floor compares real held-out "
        "(val+test) images with the same train subsample). Features: the 128-d penultimate layer of the domain CNN "
        f"trained on the real train split (validation accuracy {v('domain_val_accuracy')}, test accuracy "
        f"{v('domain_test_accuracy')}).",
        "",
        "| metric | synthetic | real reference | n | reading |",
        "|---|---|---|---|---|",
    ]
    for name, key, floor, reading, count in TABLE:
        n = _fmt(int(m[count])) if count in m else "-"
        lines.append(f"| {name} | {v(key)} | {v(floor)} | {n} | {reading} |")
    lines += [
        "",
        f"## Utility (classifier recipe: {details['classifier_recipe']}; {int(m['classifier_steps'])} steps each; "
        f"mean ± std over {int(m['classifier_seeds'])} seeds {details['utility']['seeds']})",
        "",
    ]
    reasons = {not_measurable.get(f"{who}_balanced_accuracy") for who in ("tstr", "trtr", "mixed")}
    if len(reasons) == 1 and None not in reasons:  # one reason for every classifier: say it once
        lines += [f"Not measurable: {reasons.pop()}.", ""]
    else:
        lines += _utility_table(m, not_measurable)
    lines += [
        "## Per class",
        "",
        "| class | class fidelity | MS-SSIM synthetic | MS-SSIM real | near copies (pixel) |",
        "|---|---|---|---|---|",
    ]
    for row in details["per_class"]:
        lines.append(
            f"| {row['class']} | {_fmt(row['class_fidelity'])} | {_fmt(row['ms_ssim_synthetic'])} | "
            f"{_fmt(row['ms_ssim_real'])} | {row['near_copies']} |"
        )
    mem = details["memorization"]
    lines += [
        "",
        "## Memorization",
        "",
        f"Pixel space: L2 between images area-averaged to {mem['pixel_side']} px. Near copy: nearest-train distance "
        f"below {mem['ratio']} x the median test-to-train nearest distance ({_fmt(mem['test_median_pixel'])}), i.e. "
        f"below {_fmt(mem['threshold_pixel'])}. Median synthetic nearest-train distance: "
        f"{_fmt(mem['synthetic_median_pixel'])}. "
        "`nearest_pairs.png`: the closest synthetic images (left of each pair) next to their nearest training image.",
        "",
        "## Gates",
        "",
        "| gate | value | rule | result |",
        "|---|---|---|---|",
    ]
    for g in gates:
        shown = _fmt(g.value) if not g.reason else f"not measurable: {g.reason}"
        lines.append(f"| {g.name} | {shown} | {g.op} {g.threshold:g} | {'pass' if g.passed else 'FAIL'} |")
    lines += ["", "Figures: `samples.png` (per class row: 8 synthetic, then 8 real train), `nearest_pairs.png`.", ""]
    for note in details.get("notes", []):
        lines.append(f"- {note}")
    return "\n".join(lines) + "\n"


def _finite(obj: Any) -> Any:
    """NaN/inf -> None, so metrics.json is strict JSON."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, (float, np.floating)) and not math.isfinite(float(obj)):
        return None
    return obj


def write_report(
    out_dir: Path,
    title: str,
    metrics: dict[str, float],
    not_measurable: dict[str, str],
    gates: list[Any],
    details: dict[str, Any],
    figures: dict[str, np.ndarray],
) -> Path:
    """Write metrics.json, report.md and the figure PNGs into `out_dir` (created if needed); returns `out_dir`.

    In ``metrics.json`` a figure that could not be measured appears under ``metrics`` as the text
    ``"not measurable: <reason>"`` (never NaN or 0), and again under ``not_measurable`` with its bare reason.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, image in figures.items():
        save_png(image, out_dir / name)
    shown: dict[str, Any] = {**metrics, **{k: f"{NOT_MEASURABLE}: {r}" for k, r in not_measurable.items()}}
    payload = _finite(
        {
            "title": title,
            "metrics": shown,
            "not_measurable": dict(not_measurable),
            "gates": [g.as_dict() for g in gates],
            "details": details,
        }
    )
    atomic_write_json(out_dir / "metrics.json", payload)
    atomic_write_text(out_dir / "report.md", markdown(title, metrics, not_measurable, gates, details))
    return out_dir
