"""The scoring of synthetic images against a real slice dataset (`evaluate_images`): figures, gates, the report."""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medgan.config import Config
from medgan.evaluate import metrics as M
from medgan.evaluate.features import Recipe, predict, real_classifier
from medgan.evaluate.gates import NOT_MEASURABLE, EvalResult, check_gates
from medgan.evaluate.gates import describe_value as describe_figure
from medgan.evaluate.memorization import measure_memorization
from medgan.evaluate.report import pairs_figure, sample_figure, write_report
from medgan.evaluate.utility import KEYS as UTILITY_KEYS
from medgan.evaluate.utility import classifier_seeds, measure_utility

if TYPE_CHECKING:
    from medgan.dataset import SliceDataset

DISTRIBUTION_KEYS = (
    *("fd", "fd_real_floor", "kid_x1000", "kid_std_x1000", "kid_real_floor_x1000", "precision", "recall"),
    *("precision_real_floor", "recall_real_floor", "density", "coverage", "density_real_floor", "coverage_real_floor"),
)


def _recipes(cfg: Config) -> tuple[Recipe, Recipe]:
    ev = cfg.eval
    return (
        Recipe(epochs=ev.feature_epochs, seed=ev.seed, min_steps=ev.classifier_min_steps),
        Recipe(epochs=ev.classifier_epochs, seed=ev.seed, min_steps=ev.classifier_min_steps),
    )


def _subsample(x: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return x if len(x) <= n else x[np.sort(rng.choice(len(x), n, replace=False))]


def evaluate_images(
    synthetic_images: np.ndarray,
    synthetic_labels: np.ndarray,
    dataset: SliceDataset,
    cfg: Config,
    out_dir: Path,
    *,
    title: str = "Synthetic data evaluation",
    cache_dir: Path | None = None,
    notes: list[str] | None = None,
) -> EvalResult:
    """Evaluate synthetic images against a real slice dataset and write the report.

    Args:
        synthetic_images: [N, 1, 128, 128] in [-1, 1].
        synthetic_labels: int [N], the class each image was asked for (indexes ``dataset.classes``).
        dataset: the real dataset (train trains the networks; val validates the domain network; test is the utility
            and memorization reference).
        cfg: the resolved config (``cfg.eval`` holds budgets, thresholds and gates).
        out_dir: the report folder.
        title: the report's heading.
        cache_dir: domain-network cache root (default ``cfg.eval.cache_dir`` or ``~/.cache/medgan``).
        notes: lines for the report and the summary (provenance caveats).

    Returns:
        An EvalResult with gates checked (no registry step happens here).

    Raises:
        ValueError: a synthetic dataset as reference, an empty train or test split, or shapes/labels that do not fit.
    """
    ev, C = cfg.eval, len(dataset.classes)
    labels_syn = np.asarray(synthetic_labels, dtype=np.int64)
    if synthetic_images.ndim != 4 or synthetic_images.shape[1:] != dataset.images.shape[1:]:
        raise ValueError(
            f"synthetic images must be [N, {', '.join(map(str, dataset.images.shape[1:]))}], "
            f"got {synthetic_images.shape}"
        )
    if len(labels_syn) != len(synthetic_images) or len(labels_syn) < 2 or labels_syn.min() < 0 or labels_syn.max() >= C:
        raise ValueError(
            f"need >= 2 synthetic images with one label in [0, {C}) each; got {len(synthetic_images)} images, "
            f"{len(labels_syn)} labels"
        )
    train_idx, val_idx, test_idx = (dataset.indices(s) for s in ("train", "val", "test"))
    if len(test_idx) < 2:
        raise ValueError(
            f"{dataset.path}: the test split has {len(test_idx)} images; TSTR and the memorization check need a "
            "real test split (re-ingest with ingest.split_fractions that give test rows)"
        )
    cache_dir = cache_dir if cache_dir is not None else (Path(ev.cache_dir) if ev.cache_dir else None)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    labels = dataset.labels
    y_train, y_test = labels[train_idx], labels[test_idx]
    heldout_idx = np.concatenate([val_idx, test_idx])
    train_x = np.asarray(dataset.images[train_idx])  # float16 in RAM: read once, used by every stage
    test_x = np.asarray(dataset.images[test_idx])

    # Domain network and its features (trained on real train only; cached by dataset hash + recipe).
    feat_recipe, cls_recipe = _recipes(cfg)
    domain, dinfo = real_classifier(dataset, feat_recipe, cache_dir)
    timings["domain_network_s"] = time.perf_counter() - t
    t = time.perf_counter()
    _, f_train = predict(domain, train_x)
    p_test, f_test = predict(domain, test_x)
    _, f_val = predict(domain, dataset.images[val_idx]) if len(val_idx) else (None, np.zeros((0, f_test.shape[1])))
    p_syn, f_syn = predict(domain, synthetic_images)
    # One global scale (the train features' RMS) so KID's cubic kernel sees O(1) coordinates; FD is in these units.
    scale = float(np.sqrt(np.mean(f_train**2))) or 1.0
    f_train, f_val, f_test, f_syn = (f / scale for f in (f_train, f_val, f_test, f_syn))
    f_heldout = np.concatenate([f_val, f_test])
    timings["features_s"] = time.perf_counter() - t
    # What each split can measure: a classifier score needs >= 2 classes among the images it is scored on.
    nm: dict[str, str] = {}  # figure -> why it is not measurable
    why_test = _one_class_reason("test", y_test, dataset.classes)
    why_val = _one_class_reason("val", labels[val_idx], dataset.classes) if len(val_idx) else "there is no val split"
    why_classes = f"the dataset has one class ({dataset.classes[0]}): any classifier recognises it" if C < 2 else ""
    notes = list(notes or [])
    if why_classes:
        notes.append(
            "with one class the domain network learns nothing (its loss is zero), so FD, KID, precision/recall and "
            "density/coverage compare images in the features of an untrained network"
        )

    # Fidelity and coverage at equal sample counts (FD and k-NN metrics depend on n); KID is unbiased, uses subsets.
    t = time.perf_counter()
    rng = np.random.default_rng(ev.seed)
    n_eval = int(min(len(f_syn), len(f_heldout), len(f_train)))
    ref, syn_s, held_s = (_subsample(x, n_eval, rng) for x in (f_train, f_syn, f_heldout))
    m: dict[str, float] = {
        "n_synthetic": len(f_syn),
        "n_train": len(train_idx),
        "n_val": len(val_idx),
        "n_test": len(test_idx),
        "n_heldout": len(heldout_idx),
        "n_eval": n_eval,
    }
    if n_eval >= 2:
        m["fd"], m["fd_real_floor"] = M.frechet_distance(syn_s, ref), M.frechet_distance(held_s, ref)
        kid, kid_std, m["kid_subset_size"] = M.kernel_inception_distance(f_syn, f_train, ev.kid_subsets, seed=ev.seed)
        kid_floor, _, _ = M.kernel_inception_distance(f_heldout, f_train, ev.kid_subsets, seed=ev.seed)
        m.update(kid_x1000=1000 * kid, kid_std_x1000=1000 * kid_std, kid_real_floor_x1000=1000 * kid_floor)
        m["precision"], m["recall"] = M.precision_recall(ref, syn_s, k=3)
        m["precision_real_floor"], m["recall_real_floor"] = M.precision_recall(ref, held_s, k=3)
        m["density"], m["coverage"] = M.density_coverage(ref, syn_s, k=5)
        m["density_real_floor"], m["coverage_real_floor"] = M.density_coverage(ref, held_s, k=5)
    else:
        for key in DISTRIBUTION_KEYS:
            nm[key] = f"{n_eval} image(s) per side (synthetic, train, held-out); needs >= 2"
    if n_eval >= 2 and min(m["precision_real_floor"], m["recall_real_floor"]) == 0:
        notes.append(
            f"real held-out images themselves score precision {m['precision_real_floor']:.2g} / recall "
            f"{m['recall_real_floor']:.2g} against the train split (n={n_eval} per side): the held-out patients lie "
            "outside the train manifold (another scanner or protocol, or too few images), so the synthetic "
            "precision/recall/coverage have no real reference to be read against"
        )
    timings["distribution_s"] = time.perf_counter() - t

    # Class fidelity: does the domain classifier see the class that was asked for?
    class_fidelity, fidelity = M.per_class_accuracy(p_syn.argmax(1), labels_syn, C)
    if why_classes:
        nm["class_fidelity"] = why_classes
    else:
        m["class_fidelity"] = class_fidelity
    for name, v in zip(dataset.classes, fidelity, strict=True):
        key = f"class_fidelity.{name}"
        if why_classes:
            nm[key] = why_classes
        elif np.isnan(v):
            nm[key] = f"no synthetic image of class {name}"
        else:
            m[key] = v
    if why_val:
        nm["domain_val_accuracy"] = why_val
    else:
        m["domain_val_accuracy"] = dinfo["val_accuracy"]
    if why_test:
        nm["domain_test_accuracy"] = why_test
    else:
        m["domain_test_accuracy"] = float((p_test.argmax(1) == y_test).mean())

    # Utility: TSTR, TRTR and real+synthetic, the same recipe and step count, mean ± std over eval.seeds seeds.
    t = time.perf_counter()
    seeds = classifier_seeds(ev.seed, ev.seeds)
    utility_details: dict = {"seeds": seeds}
    if why_test:
        m["classifier_steps"] = cls_recipe.steps(len(train_idx))
        nm.update({key: why_test for key in UTILITY_KEYS})
    else:
        um, unm, utility_details = measure_utility(
            dataset,
            (train_x, y_train),
            (test_x, y_test),
            (synthetic_images, labels_syn),
            cls_recipe,
            seeds,
            cache_dir,
            reuse=(feat_recipe, domain, dinfo),
        )
        m.update(um)
        nm.update(unm)
    m["classifier_seeds"] = len(seeds)
    timings["utility_s"] = time.perf_counter() - t

    # Diversity: within-class MS-SSIM of synthetic pairs next to real train pairs.
    t = time.perf_counter()
    ms_syn, m["ms_ssim_pairs"] = M.within_class_ms_ssim(synthetic_images, labels_syn, C, ev.diversity_pairs, ev.seed)
    ms_real, _ = M.within_class_ms_ssim(train_x, y_train, C, ev.diversity_pairs, ev.seed)
    for key, values, who in (("ms_ssim_synthetic", ms_syn, "synthetic"), ("ms_ssim_real", ms_real, "real train")):
        if np.isnan(values).all():
            nm[key] = f"no class has 2 {who} images to pair"
        else:
            m[key] = float(np.nanmean(values))
    for name, v in zip(dataset.classes, ms_syn, strict=True):
        if np.isnan(v):
            nm[f"ms_ssim_synthetic.{name}"] = f"fewer than 2 synthetic images of class {name}"
        else:
            m[f"ms_ssim_synthetic.{name}"] = v
    timings["diversity_s"] = time.perf_counter() - t

    # Memorization: nearest train image of every synthetic image vs how close real unseen (test) images come.
    t = time.perf_counter()
    unseen = ("val", dataset.images[val_idx]) if len(val_idx) else ("test", test_x)
    mm, mem = measure_memorization(train_x, test_x, unseen, synthetic_images, (f_train, f_test, f_syn), ev)
    m.update(mm)
    if m["near_copy_fraction_real"] > ev.gate_max_near_copy_fraction:
        notes.append(
            f"{m['near_copy_fraction_real']:.1%} of real {unseen[0]} images are near copies "
            "of a train image under the same rule: the splits share near-duplicates (deduplicate before splitting), "
            "and even an ideal generator would exceed the near-copy gate; compare the synthetic fraction with it",
        )
    copies, j_syn, closest, d_syn = (mem.pop(k) for k in ("copies", "nearest_train", "closest", "d_syn"))
    timings["memorization_s"] = time.perf_counter() - t

    m = {k: float(v) for k, v in m.items()}
    gates = check_gates(m, ev, nm)
    counts = np.bincount(labels_syn, minlength=C)
    details = {
        "classes": dataset.classes,
        "dataset": {"path": str(dataset.path), "content_hash": dataset.content_hash},
        "n_per_class_text": ", ".join(f"{n} {c}" for c, n in zip(dataset.classes, counts, strict=True)),
        "domain_network": dict(dinfo),
        "classifier_recipe": ", ".join(f"{k}={v}" for k, v in asdict(cls_recipe).items() if k != "seed"),
        "utility": utility_details,
        "per_class": [
            {
                "class": c,
                "class_fidelity": describe_figure(f"class_fidelity.{c}", m, nm),
                "ms_ssim_synthetic": describe_figure(f"ms_ssim_synthetic.{c}", m, nm),
                "ms_ssim_real": ms_real[i] if not np.isnan(ms_real[i]) else f"{NOT_MEASURABLE}: fewer than 2 images",
                "near_copies": int(copies[labels_syn == i].sum()),
                "n_synthetic": int(counts[i]),
            }
            for i, c in enumerate(dataset.classes)
        ],
        "memorization": {
            **mem,
            "closest_pairs": [
                {"synthetic": int(s), "train_row": int(train_idx[j_syn[s]]), "distance": float(d_syn[s])}
                for s in closest
            ],
        },
        "seconds": {k: round(v, 2) for k, v in timings.items()},
        "notes": notes,
    }
    figures = {
        "samples.png": sample_figure(synthetic_images, labels_syn, train_x, y_train, C),
        "nearest_pairs.png": pairs_figure(synthetic_images, train_x, [(int(s), int(j_syn[s])) for s in closest]),
    }
    out_dir = write_report(out_dir, title, m, nm, gates, details, figures)
    # The domain network travels with the report (and so into the MLflow evaluation run).
    shutil.copyfile(dinfo["cache_path"], out_dir / "domain_network.pt")
    return EvalResult(metrics=m, gates=gates, report_dir=out_dir, not_measurable=nm, notes=notes)


def _one_class_reason(split: str, labels: np.ndarray, classes: list[str]) -> str:
    present = [classes[i] for i in np.unique(labels)]
    if len(present) >= 2:
        return ""
    what = f"one class ({present[0]})" if present else "no images"
    return f"the {split} split has {what}: a classifier that always answers it would score 1"
