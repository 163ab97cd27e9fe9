"""Downstream utility: classifiers trained on synthetic (TSTR), real (TRTR) and real + synthetic data, each scored on
the real test split, as mean and spread over several classifier seeds.

One seed moves a small classifier's balanced accuracy by up to ~0.1 on a few thousand images, so a single TSTR/TRTR
number cannot tell two generators apart; every figure here is the mean over ``eval.seeds`` seeds with its standard
deviation. All three classifiers share the recipe and the step count of the TRTR classifier (Esteban et al. 2017), so
"real + synthetic vs real alone" answers the user's question, does adding synthetic data help, at equal compute.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medgan.evaluate import metrics as M
from medgan.evaluate.features import DomainNet, Recipe, fit_classifier, predict, real_classifier

if TYPE_CHECKING:
    from medgan.dataset import SliceDataset

WHO = ("tstr", "trtr", "mixed")  # trained on synthetic, on real train, on real train + synthetic
SCORES = ("accuracy", "balanced_accuracy", "macro_auc")
KEYS = (
    *(f"{who}_{what}{std}" for who in WHO for what in SCORES for std in ("", "_std")),
    *("tstr_trtr_ratio", "tstr_trtr_ratio_std", "tstr_trtr_auc_ratio", "tstr_trtr_auc_ratio_std"),
    *("mixed_trtr_delta", "mixed_trtr_delta_std", "mixed_trtr_auc_delta", "mixed_trtr_auc_delta_std"),
)


def classifier_seeds(base_seed: int, n_seeds: int) -> list[int]:
    """The classifier seeds: ``base_seed + 0 .. n_seeds - 1``."""
    if n_seeds < 1:
        raise ValueError(f"eval.seeds is {n_seeds}; use at least 1 (3 or more to see the spread)")
    return [base_seed + k for k in range(n_seeds)]


def _mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def measure_utility(
    dataset: SliceDataset,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    synthetic: tuple[np.ndarray, np.ndarray],
    recipe: Recipe,
    seeds: list[int],
    cache_dir: Path | None,
    reuse: tuple[Recipe, DomainNet, dict] | None = None,
) -> tuple[dict[str, float], dict[str, str], dict[str, Any]]:
    """TSTR, TRTR and real+synthetic scores on the real test split, mean and std over `seeds`.

    Args:
        dataset: the real dataset (TRTR classifiers are cached by its content hash).
        train: (images, labels) of the real train split.
        test: (images, labels) of the real test split (>= 2 classes; the caller checks).
        synthetic: (images, labels asked for).
        recipe: the classifier recipe; its seed is replaced by each of `seeds`.
        seeds: classifier seeds.
        cache_dir: domain-network cache root.
        reuse: (recipe, network, info) of an already trained real classifier (the domain network) to reuse when a
            seed's recipe equals it.

    Returns:
        (metrics, not measurable: key -> reason, details with the per-seed scores).
    """
    (train_x, y_train), (test_x, y_test), (syn_x, y_syn) = train, test, synthetic
    c = len(dataset.classes)
    mixed_x = np.concatenate([np.asarray(train_x, dtype=np.float32), np.asarray(syn_x, dtype=np.float32)])
    mixed_y = np.concatenate([y_train, y_syn])
    per_seed: dict[str, list[dict[str, float]]] = {who: [] for who in WHO}
    steps = 0
    for seed in seeds:
        r = replace(recipe, seed=seed)
        if reuse is not None and reuse[0] == r:
            trtr, tinfo = reuse[1], reuse[2]
        else:
            trtr, tinfo = real_classifier(dataset, r, cache_dir)
        steps = int(tinfo["steps"])
        nets = {
            "trtr": trtr,
            "tstr": fit_classifier(syn_x, y_syn, c, r, steps=steps),
            "mixed": fit_classifier(mixed_x, mixed_y, c, r, steps=steps),
        }
        for who, net in nets.items():
            per_seed[who].append(M.classification_scores(y_test, predict(net, test_x)[0]))

    m: dict[str, float] = {"classifier_seeds": len(seeds), "classifier_steps": steps}
    nm: dict[str, str] = {}
    missing = sorted(set(dataset.classes) - {dataset.classes[i] for i in np.unique(y_test)})
    auc_reason = f"class(es) {', '.join(missing)} absent from the test split (macro AUC needs each class)"
    for who in WHO:
        for what in SCORES:
            values = [s[what] for s in per_seed[who]]
            if np.isnan(values).any():
                nm[f"{who}_{what}"] = nm[f"{who}_{what}_std"] = auc_reason
            else:
                m[f"{who}_{what}"], m[f"{who}_{what}_std"] = _mean_std(values)

    # Ratios and differences are paired by seed (the same seed's TSTR over its TRTR), then averaged.
    def paired(name: str, what: str, op: str) -> None:
        a, b = ("tstr", "trtr") if op == "ratio" else ("mixed", "trtr")
        if f"{a}_{what}" not in m or f"{b}_{what}" not in m:
            nm[name] = nm[f"{name}_std"] = nm.get(f"{b}_{what}", nm.get(f"{a}_{what}", "not measured"))
            return
        x = np.array([s[what] for s in per_seed[a]])
        y = np.array([s[what] for s in per_seed[b]])
        if op == "ratio" and (y <= 0).any():
            nm[name] = nm[f"{name}_std"] = (
                f"TRTR {what.replace('_', ' ')} is 0 (the real-data classifier learned nothing)"
            )
            return
        m[name] = float(x.mean() / y.mean()) if op == "ratio" else float((x - y).mean())
        m[f"{name}_std"] = _mean_std(list(x / y if op == "ratio" else x - y))[1]

    paired("tstr_trtr_ratio", "balanced_accuracy", "ratio")
    paired("tstr_trtr_auc_ratio", "macro_auc", "ratio")
    paired("mixed_trtr_delta", "balanced_accuracy", "delta")
    paired("mixed_trtr_auc_delta", "macro_auc", "delta")
    details = {"seeds": list(seeds), "per_seed": per_seed, "n_mixed_train": len(mixed_y)}
    return m, nm, details
