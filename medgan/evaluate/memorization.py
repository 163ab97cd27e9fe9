"""Memorization: how close each synthetic image comes to a training image, against how close unseen real images come.

A synthetic image is a near copy when its nearest train image is closer than ``eval.near_copy_ratio`` x the median
nearest-train distance of real test images (a fresh patient's slice), in pixel space (64 px area averages, robust to
pixel noise) and in domain-feature space. The same rule applied to real unseen images gives the dataset's own base rate.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medgan.config import EvalConfig
from medgan.evaluate import metrics as M

PIXEL_SIDE = 64  # memorization pixel space: 128 px slices area-averaged to 64 px (4096-d), robust to pixel noise


def measure_memorization(
    train_x: np.ndarray,
    test_x: np.ndarray,
    unseen: tuple[str, np.ndarray],
    synthetic: np.ndarray,
    features: tuple[np.ndarray, np.ndarray, np.ndarray],
    ev: EvalConfig,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Near-copy fractions and nearest-neighbour distance ratios.

    Args:
        train_x, test_x: real train and test images [N, 1, H, W].
        unseen: (split name, images) of real images the generator never saw (val, else test): the base rate.
        synthetic: synthetic images [N, 1, H, W].
        features: domain features of (train, test, synthetic).
        ev: ``cfg.eval`` (``near_copy_ratio``, ``n_figure_pairs``).

    Returns:
        (metrics, details: threshold and medians, plus ``copies`` (bool per synthetic image), ``nearest_train``
        (index into train_x), ``closest`` (synthetic indices, closest first) and ``d_syn``).
    """
    f_train, f_test, f_syn = features
    px_train = M.pixel_vectors(train_x, PIXEL_SIDE)
    d_syn, j_syn = M.nearest_neighbours(M.pixel_vectors(synthetic, PIXEL_SIDE), px_train)
    d_test, _ = M.nearest_neighbours(M.pixel_vectors(test_x, PIXEL_SIDE), px_train)
    copies, threshold = M.near_copies(d_syn, d_test, ev.near_copy_ratio)
    fd_syn, _ = M.nearest_neighbours(f_syn, f_train)
    fd_test, _ = M.nearest_neighbours(f_test, f_train)
    copies_f, _ = M.near_copies(fd_syn, fd_test, ev.near_copy_ratio)
    # Base rate: real images the generator never saw under the same threshold. Above zero, the dataset itself holds
    # near-duplicates across splits (same patient, re-encoded copies).
    d_unseen, _ = M.nearest_neighbours(M.pixel_vectors(unseen[1], PIXEL_SIDE), px_train)
    m = {
        "near_copy_fraction": float(copies.mean()),
        "near_copy_fraction_features": float(copies_f.mean()),
        "near_copy_fraction_real": float((d_unseen < threshold).mean()),
        "nn_distance_ratio": float(np.median(d_syn) / max(np.median(d_test), 1e-12)),
        "nn_distance_ratio_features": float(np.median(fd_syn) / max(np.median(fd_test), 1e-12)),
    }
    details = {
        "pixel_side": PIXEL_SIDE,
        "ratio": ev.near_copy_ratio,
        "threshold_pixel": threshold,
        "test_median_pixel": float(np.median(d_test)),
        "synthetic_median_pixel": float(np.median(d_syn)),
        "base_rate_split": unseen[0],
        "copies": copies,
        "nearest_train": j_syn,
        "closest": np.argsort(d_syn, kind="stable")[: ev.n_figure_pairs],
        "d_syn": d_syn,
    }
    return m, details
