"""`medgan evaluate`: offline quality, downstream utility and privacy of a generator, with a promotion gate.

Three entry points, each a layer on the next:

- `run_evaluate` resolves a model reference (registry, run, checkpoint, or an exported synthetic dataset), evaluates it,
  records the evaluation in MLflow and, with ``promote``, moves alias ``champion`` when every gate passes.
- `evaluate_generator` samples ``eval.n_per_class`` images per class from a `LoadedGenerator` and evaluates them.
- `evaluate_images` is the core: synthetic images + the labels they were asked for, against a real slice dataset.

No network access and no ImageNet weights: every feature comes from a domain CNN trained on the real train split
(`medgan.evaluate.features`). All of it runs on the CPU.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medgan.config import Config
from medgan.evaluate import metrics as M
from medgan.evaluate.features import Recipe, fit_classifier, predict, real_classifier
from medgan.evaluate.gates import EvalResult, GateResult, check_gates
from medgan.evaluate.report import pairs_figure, sample_figure, write_report

if TYPE_CHECKING:
    from medgan.ingest.store import SliceDataset

PIXEL_SIDE = 64  # memorization pixel space: 128 px slices area-averaged to 64 px (4096-d), robust to pixel noise
SEED_STRIDE = 1_000_003  # synthetic image i of class c uses seed eval.seed * SEED_STRIDE + c * n_per_class + i

__all__ = ["EvalResult", "GateResult", "check_gates", "evaluate_generator", "evaluate_images", "run_evaluate"]


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
    m["fd"], m["fd_real_floor"] = M.frechet_distance(syn_s, ref), M.frechet_distance(held_s, ref)
    kid, kid_std, m["kid_subset_size"] = M.kernel_inception_distance(f_syn, f_train, ev.kid_subsets, seed=ev.seed)
    kid_floor, _, _ = M.kernel_inception_distance(f_heldout, f_train, ev.kid_subsets, seed=ev.seed)
    m.update(kid_x1000=1000 * kid, kid_std_x1000=1000 * kid_std, kid_real_floor_x1000=1000 * kid_floor)
    m["precision"], m["recall"] = M.precision_recall(ref, syn_s, k=3)
    m["precision_real_floor"], m["recall_real_floor"] = M.precision_recall(ref, held_s, k=3)
    m["density"], m["coverage"] = M.density_coverage(ref, syn_s, k=5)
    m["density_real_floor"], m["coverage_real_floor"] = M.density_coverage(ref, held_s, k=5)
    timings["distribution_s"] = time.perf_counter() - t

    # Class fidelity: does the domain classifier see the class that was asked for?
    m["class_fidelity"], fidelity = M.per_class_accuracy(p_syn.argmax(1), labels_syn, C)
    m["domain_val_accuracy"] = dinfo["val_accuracy"]
    m["domain_test_accuracy"] = float((p_test.argmax(1) == y_test).mean())
    for name, v in zip(dataset.classes, fidelity, strict=True):
        m[f"class_fidelity.{name}"] = v

    # Utility: TRTR (cached, = the domain network when budgets match) and TSTR with the same recipe and step count.
    t = time.perf_counter()
    trtr, tinfo = (domain, dinfo) if cls_recipe == feat_recipe else real_classifier(dataset, cls_recipe, cache_dir)
    tstr = fit_classifier(synthetic_images, labels_syn, C, cls_recipe, steps=tinfo["steps"])
    m["classifier_steps"] = tinfo["steps"]
    scores = {
        "trtr": M.classification_scores(y_test, p_test if trtr is domain else predict(trtr, test_x)[0]),
        "tstr": M.classification_scores(y_test, predict(tstr, test_x)[0]),
    }
    for who, s in scores.items():
        m.update({f"{who}_{k}": v for k, v in s.items()})
    m["tstr_trtr_ratio"] = (
        m["tstr_balanced_accuracy"] / m["trtr_balanced_accuracy"] if m["trtr_balanced_accuracy"] > 0 else float("nan")
    )
    timings["utility_s"] = time.perf_counter() - t

    # Diversity: within-class MS-SSIM of synthetic pairs next to real train pairs.
    t = time.perf_counter()
    ms_syn, m["ms_ssim_pairs"] = M.within_class_ms_ssim(synthetic_images, labels_syn, C, ev.diversity_pairs, ev.seed)
    ms_real, _ = M.within_class_ms_ssim(train_x, y_train, C, ev.diversity_pairs, ev.seed)
    m["ms_ssim_synthetic"], m["ms_ssim_real"] = float(np.nanmean(ms_syn)), float(np.nanmean(ms_real))
    for name, v in zip(dataset.classes, ms_syn, strict=True):
        m[f"ms_ssim_synthetic.{name}"] = v
    timings["diversity_s"] = time.perf_counter() - t

    # Memorization: nearest train image of every synthetic image vs how close real unseen (test) images come.
    t = time.perf_counter()
    px_train = M.pixel_vectors(train_x, PIXEL_SIDE)
    d_syn, j_syn = M.nearest_neighbours(M.pixel_vectors(synthetic_images, PIXEL_SIDE), px_train)
    d_test, _ = M.nearest_neighbours(M.pixel_vectors(test_x, PIXEL_SIDE), px_train)
    copies, threshold = M.near_copies(d_syn, d_test, ev.near_copy_ratio)
    fd_syn, _ = M.nearest_neighbours(f_syn, f_train)
    fd_test, _ = M.nearest_neighbours(f_test, f_train)
    copies_f, _ = M.near_copies(fd_syn, fd_test, ev.near_copy_ratio)
    m["near_copy_fraction"], m["near_copy_fraction_features"] = float(copies.mean()), float(copies_f.mean())
    # Base rate: real images the generator never saw (val, else test) under the same threshold. Above zero, the
    # dataset itself holds near-duplicates across splits (same patient, re-encoded copies).
    unseen = dataset.images[val_idx] if len(val_idx) else test_x
    d_unseen, _ = M.nearest_neighbours(M.pixel_vectors(unseen, PIXEL_SIDE), px_train)
    m["near_copy_fraction_real"] = float((d_unseen < threshold).mean())
    if m["near_copy_fraction_real"] > ev.gate_max_near_copy_fraction:
        notes = [
            *(notes or []),
            f"{m['near_copy_fraction_real']:.1%} of real {'val' if len(val_idx) else 'test'} images are near copies "
            "of a train image under the same rule: the splits share near-duplicates (deduplicate before splitting), "
            "and even an ideal generator would exceed the near-copy gate; compare the synthetic fraction with it",
        ]
    m["nn_distance_ratio"] = float(np.median(d_syn) / max(np.median(d_test), 1e-12))
    m["nn_distance_ratio_features"] = float(np.median(fd_syn) / max(np.median(fd_test), 1e-12))
    closest = np.argsort(d_syn, kind="stable")[: ev.n_figure_pairs]
    timings["memorization_s"] = time.perf_counter() - t

    m = {k: float(v) for k, v in m.items()}
    gates = check_gates(m, ev)
    counts = np.bincount(labels_syn, minlength=C)
    details = {
        "classes": dataset.classes,
        "dataset": {"path": str(dataset.path), "content_hash": dataset.content_hash},
        "n_per_class_text": ", ".join(f"{n} {c}" for c, n in zip(dataset.classes, counts, strict=True)),
        "domain_network": dict(dinfo),
        "classifier_recipe": ", ".join(f"{k}={v}" for k, v in asdict(cls_recipe).items()),
        "per_class": [
            {
                "class": c,
                "class_fidelity": fidelity[i],
                "ms_ssim_synthetic": ms_syn[i],
                "ms_ssim_real": ms_real[i],
                "near_copies": int(copies[labels_syn == i].sum()),
                "n_synthetic": int(counts[i]),
            }
            for i, c in enumerate(dataset.classes)
        ],
        "memorization": {
            "pixel_side": PIXEL_SIDE,
            "ratio": ev.near_copy_ratio,
            "threshold_pixel": threshold,
            "test_median_pixel": float(np.median(d_test)),
            "synthetic_median_pixel": float(np.median(d_syn)),
            "closest_pairs": [
                {"synthetic": int(s), "train_row": int(train_idx[j_syn[s]]), "distance": float(d_syn[s])}
                for s in closest
            ],
        },
        "seconds": {k: round(v, 2) for k, v in timings.items()},
        "notes": list(notes or []),
    }
    figures = {
        "samples.png": sample_figure(synthetic_images, labels_syn, train_x, y_train, C),
        "nearest_pairs.png": pairs_figure(synthetic_images, train_x, [(int(s), int(j_syn[s])) for s in closest]),
    }
    out_dir = write_report(out_dir, title, m, gates, details, figures)
    # The domain network travels with the report (and so into the MLflow evaluation run).
    shutil.copyfile(dinfo["cache_path"], out_dir / "domain_network.pt")
    return EvalResult(metrics=m, gates=gates, report_dir=out_dir, notes=list(notes or []))


def synthetic_labels_and_seeds(num_classes: int, n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The (label, seed) pairs evaluation samples: `n_per_class` per class; seed = f(eval.seed, class, i)."""
    labels = np.repeat(np.arange(num_classes), n_per_class)
    seeds = seed * SEED_STRIDE + np.arange(num_classes * n_per_class)
    return labels, seeds


def evaluate_generator(
    loaded: Any, dataset: SliceDataset, cfg: Config, out_dir: Path, *, cache_dir: Path | None = None
) -> EvalResult:
    """Sample ``cfg.eval.n_per_class`` images per class from a generator and evaluate them (`evaluate_images`).

    Args:
        loaded: a `medgan.models.generator.LoadedGenerator` (its classes must equal the dataset's, in order).
        dataset: the real slice dataset.
        cfg: the resolved config.
        out_dir: the report folder.
        cache_dir: domain-network cache root.

    Raises:
        ValueError: the generator's classes differ from the dataset's.
    """
    from medgan.models.generator import generate

    if list(loaded.classes) != dataset.classes:
        raise ValueError(
            f"the generator knows classes {loaded.classes} but {dataset.path} has {dataset.classes}; evaluate "
            "against the dataset it was trained on"
        )
    labels, seeds = synthetic_labels_and_seeds(len(dataset.classes), cfg.eval.n_per_class, cfg.eval.seed)
    t = time.perf_counter()
    images = generate(loaded.G, labels, seeds)
    notes = [f"{len(images)} images generated in {time.perf_counter() - t:.1f} s (seeds {seeds[0]}..{seeds[-1]})"]
    if loaded.info.get("dataset_hash") and loaded.info["dataset_hash"] != dataset.content_hash:
        notes.append(
            f"the generator was trained on dataset {str(loaded.info['dataset_hash'])[:12]} but evaluated against "
            f"{dataset.content_hash[:12]} ({dataset.path}): the memorization check uses this dataset's train split"
        )
    name = loaded.info.get("name") or Path(str(loaded.info.get("checkpoint", "generator"))).stem
    version = f" v{loaded.info['version']}" if loaded.info.get("version") else ""
    title = f"Evaluation of {name}{version}"
    result = evaluate_images(images, labels, dataset, cfg, out_dir, title=title, cache_dir=cache_dir, notes=notes)
    result.info = dict(loaded.info)
    return result


def _exported(ref: str) -> SliceDataset | None:
    from medgan.ingest.store import SliceDataset

    path = Path(ref)
    if not (path / "dataset.json").is_file():
        return None
    ds = SliceDataset.open(path)
    if not ds.synthetic:
        raise ValueError(
            f"{path} is a real dataset (synthetic: false); --model takes a generator or an exported synthetic dataset"
        )
    return ds


def _map_labels(syn: SliceDataset, real: SliceDataset) -> np.ndarray:
    unknown = sorted(set(syn.classes) - set(real.classes))
    if unknown:
        raise ValueError(f"{syn.path} has classes {unknown} that {real.path} lacks (it has {real.classes})")
    lookup = np.array([real.classes.index(c) for c in syn.classes])
    return lookup[syn.labels]


def run_evaluate(
    cfg: Config,
    model_ref: str,
    data: Path,
    *,
    out_dir: Path | None = None,
    promote: bool = False,
    cache_dir: Path | None = None,
) -> EvalResult:
    """Evaluate a generator (or an exported synthetic dataset) against a real slice dataset; optionally promote it.

    Args:
        cfg: the resolved config (``cfg.eval``: budgets, thresholds, gates; ``cfg.track.tracking_uri``: the store).
        model_ref: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/RUN_ID``, a run id, a checkpoint file
            or run folder, or an exported synthetic dataset folder (``dataset.json`` with ``synthetic: true``).
        data: the real slice dataset the generator was trained on.
        out_dir: the report folder (default ``reports/<model name or checkpoint stem>[-v<version>]``).
        promote: move alias ``champion`` to the evaluated model version when every gate passes.
        cache_dir: domain-network cache root (default ``cfg.eval.cache_dir`` or ``~/.cache/medgan``).

    Returns:
        An EvalResult; ``promoted`` says whether ``champion`` moved, ``gates`` say which failed.

    Raises:
        ValueError: a synthetic `data`, an unknown model, mismatched classes, or ``promote`` for something that is not
            a registered model version.
        FileNotFoundError: `data` or a checkpoint does not exist.

    Example:
        >>> r = run_evaluate(load_config(), "models:/medgan-brain@candidate", Path("datasets/brain"), promote=True)
        >>> print(r.summary())
    """
    from medgan.ingest.store import SliceDataset

    dataset = SliceDataset.open(data)
    if dataset.synthetic:
        raise ValueError(
            f"--data {data} is a synthetic dataset; evaluate against the real dataset the generator learned from"
        )
    exported = _exported(model_ref)
    if exported is not None:
        if promote:
            raise ValueError(
                f"--promote needs a registered model; {model_ref} is an exported dataset (use its models:/ reference)"
            )
        out_dir = Path(out_dir) if out_dir else Path("reports") / exported.path.name
        generator = dict(exported.meta.get("generator") or {})
        note = f"exported dataset {exported.path} (generator {generator.get('model_uri', 'unknown')}): no registry step"
        result = evaluate_images(
            np.asarray(exported.images),
            _map_labels(exported, dataset),
            dataset,
            cfg,
            out_dir,
            title=f"Evaluation of exported dataset {exported.path.name}",
            cache_dir=cache_dir,
            notes=[note],
        )
        result.model_ref, result.info = model_ref, generator
        return result
    from medgan.tracking.registry import load_generator

    loaded = load_generator(model_ref, cfg.track.tracking_uri)
    name, version = loaded.info.get("name"), loaded.info.get("version")
    if promote and not (name and version):
        raise ValueError(
            f"--promote needs a registered model version; {model_ref} is not one (use models:/NAME@candidate)"
        )
    stem = name or Path(str(loaded.info.get("checkpoint", model_ref))).stem
    out_dir = Path(out_dir) if out_dir else Path("reports") / (f"{stem}-v{version}" if version else stem)
    result = evaluate_generator(loaded, dataset, cfg, out_dir, cache_dir=cache_dir)
    result.model_ref = model_ref
    if name and version or (cfg.track.enabled and loaded.info.get("run_id")):
        from medgan.tracking.evaluation import log_evaluation
        from medgan.tracking.registry import set_alias

        result.run_id = log_evaluation(cfg.track.tracking_uri, loaded.info, result.metrics, result.report_dir, dataset)
        if promote and result.gates_passed:
            set_alias(cfg.track.tracking_uri, name, version, "champion")
            result.promoted = True
        elif promote:
            failed = ", ".join(g.name for g in result.gates if not g.passed)
            result.notes.append(f"not promoted: gate(s) failed: {failed}; 'champion' is unchanged")
    else:
        result.notes.append("a checkpoint without a registered version or tracked run: nothing logged to MLflow")
    return result
