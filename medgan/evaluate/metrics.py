"""Evaluation metrics on arrays: distribution distances, coverage, class fidelity, utility, diversity, memorization.

Every function takes plain numpy arrays (features [N, D], images [N, 1, H, W] in [-1, 1], integer labels) and returns
numbers, so each can be tested on known cases without a generator, a dataset or a registry.

References:
    Heusel et al. 2017 (Frechet distance), Binkowski et al. 2018 (KID, unbiased polynomial-kernel MMD),
    Kynkaanniemi et al. 2019 (improved precision and recall, k-NN balls), Naeem et al. 2020 (density and coverage),
    Wang et al. 2003 (MS-SSIM), Esteban et al. 2017 (TSTR).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch.nn import functional as F


def _as2d(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"{name}: expected features [N >= 2, D], got shape {x.shape}")
    return x


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets: |mu_a - mu_b|^2 + Tr(Sa + Sb - 2 (Sa Sb)^1/2).

    Biased upwards for small N (it compares sample covariances), so compare values only at equal sample counts.
    """
    from scipy import linalg

    a, b = _as2d(a, "a"), _as2d(b, "b")
    mu_a, mu_b = a.mean(0), b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():
        # Fewer samples than feature dimensions make the covariances singular; sqrtm still returns the usable root.
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sa @ sb)
    if not np.isfinite(covmean).all():
        # Near-singular products: regularise both covariances slightly (as pytorch-fid does).
        eps = 1e-6 * np.eye(len(sa))
        covmean = linalg.sqrtm((sa + eps) @ (sb + eps))
    covmean = np.real(covmean)
    return float(max(0.0, ((mu_a - mu_b) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2.0 * np.trace(covmean)))


def kernel_inception_distance(
    a: np.ndarray, b: np.ndarray, n_subsets: int = 50, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float, int]:
    """KID: unbiased MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over random subsets.

    Returns:
        (mean, std over subsets, subset size used).
    """
    a, b = _as2d(a, "a"), _as2d(b, "b")
    m = int(min(subset_size, len(a), len(b)))
    d = a.shape[1]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
        # Unbiased: drop the diagonal of the within-set kernels.
        mmd = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean()
        values.append(mmd)
    return float(np.mean(values)), float(np.std(values)), m


def _pairwise(a: np.ndarray, b: np.ndarray) -> torch.Tensor:
    return torch.cdist(torch.from_numpy(np.asarray(a, np.float64)), torch.from_numpy(np.asarray(b, np.float64)))


def _kth_nn_radius(x: np.ndarray, k: int) -> np.ndarray:
    # Distance to the k-th nearest *other* point: column 0 of the sorted row is the point itself.
    d = _pairwise(x, x)
    return d.kthvalue(k + 1, dim=1).values.numpy()


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019).

    Each set's manifold is the union of balls around its points with radius = distance to the k-th nearest neighbour
    in the same set. Precision: fraction of fake points inside the real manifold. Recall: fraction of real points
    inside the fake manifold. Identical sets give (1, 1).
    """
    real, fake = _as2d(real, "real"), _as2d(fake, "fake")
    k = min(k, len(real) - 1, len(fake) - 1)
    r_real, r_fake = _kth_nn_radius(real, k), _kth_nn_radius(fake, k)
    d = _pairwise(real, fake).numpy()  # (n_real, n_fake)
    precision = (d <= r_real[:, None]).any(axis=0).mean()
    recall = (d <= r_fake[None, :]).any(axis=1).mean()
    return float(precision), float(recall)


def density_coverage(real: np.ndarray, fake: np.ndarray, k: int = 5) -> tuple[float, float]:
    """Density and coverage (Naeem et al. 2020): outlier-robust fidelity and diversity on real k-NN balls.

    Density: mean over fakes of (number of real balls containing it) / k (about 1 for matching distributions).
    Coverage: fraction of real points whose ball contains at least one fake (in [0, 1]).
    """
    real, fake = _as2d(real, "real"), _as2d(fake, "fake")
    k = min(k, len(real) - 1)
    r_real = _kth_nn_radius(real, k)
    d = _pairwise(real, fake).numpy()
    inside = d <= r_real[:, None]
    return float(inside.sum(axis=0).mean() / k), float(inside.any(axis=1).mean())


def per_class_accuracy(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[float, list[float]]:
    """Accuracy overall and per class (NaN for a class with no samples).

    For class fidelity, `pred` is the domain classifier's argmax and `labels` the classes the generator was asked for.
    """
    pred, labels = np.asarray(pred), np.asarray(labels)
    per = [float((pred[labels == c] == c).mean()) if (labels == c).any() else float("nan") for c in range(num_classes)]
    return float((pred == labels).mean()), per


def classification_scores(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy and macro one-vs-rest ROC AUC (scikit-learn) of class probabilities [N, C].

    AUC is NaN when a class is missing from `labels` (it is undefined there).
    """
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

    labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    pred = probs.argmax(1)
    out = {
        "accuracy": float(accuracy_score(labels, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(labels, pred)),
    }
    c = probs.shape[1]
    if len(np.unique(labels)) < c:
        out["macro_auc"] = float("nan")
    elif c == 2:
        out["macro_auc"] = float(roc_auc_score(labels, probs[:, 1]))
    else:
        p = probs / probs.sum(1, keepdims=True)  # roc_auc_score checks that rows sum to 1 exactly
        out["macro_auc"] = float(roc_auc_score(labels, p, multi_class="ovr", average="macro", labels=list(range(c))))
    return out


def ms_ssim(a: np.ndarray, b: np.ndarray, kernel_size: int = 7, batch_size: int = 64) -> np.ndarray:
    """MS-SSIM of image pairs with MONAI's `MultiScaleSSIMMetric` (5 scales, Gaussian kernel).

    Images in [-1, 1] are rescaled to [0, 1] (data_range 1). At 128 px five scales allow a kernel of at most 7
    (the coarsest scale is 8 px).

    Returns:
        float64 [N], one value per pair (1 for identical images).
    """
    from monai.metrics import MultiScaleSSIMMetric

    metric = MultiScaleSSIMMetric(spatial_dims=2, data_range=1.0, kernel_size=kernel_size, reduction="none")
    out = []
    for i in range(0, len(a), batch_size):
        x = (torch.from_numpy(np.ascontiguousarray(a[i : i + batch_size], np.float32)) + 1) / 2
        y = (torch.from_numpy(np.ascontiguousarray(b[i : i + batch_size], np.float32)) + 1) / 2
        out.append(metric(x.clamp(0, 1), y.clamp(0, 1)).reshape(-1).double().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def within_class_ms_ssim(
    images: np.ndarray, labels: np.ndarray, num_classes: int, n_pairs: int = 100, seed: int = 0
) -> tuple[list[float], int]:
    """Mean MS-SSIM over random pairs of distinct images of the same class: lower = more diverse.

    A collapsed generator scores near 1; compare with the same statistic on real images of the class.

    Returns:
        (per-class mean, NaN where a class has < 2 images; pairs per class actually used, the minimum over classes).
    """
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    means, used = [], []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        if len(idx) < 2:
            means.append(float("nan"))
            continue
        i = rng.choice(idx, n_pairs)
        j = rng.choice(idx, n_pairs)
        keep = i != j
        i, j = i[keep], j[keep]
        means.append(float(ms_ssim(images[i], images[j]).mean()) if len(i) else float("nan"))
        used.append(len(i))
    return means, int(min(used)) if used else 0


def pixel_vectors(images: np.ndarray, side: int = 64, chunk: int = 2048) -> np.ndarray:
    """Images [N, 1, H, W] -> float32 [N, side*side] after area-average downsampling (the memorization pixel space)."""
    out = np.empty((len(images), side * side), dtype=np.float32)
    for i in range(0, len(images), chunk):
        x = torch.from_numpy(np.ascontiguousarray(images[i : i + chunk], dtype=np.float32))
        x = F.adaptive_avg_pool2d(x, side) if x.shape[-1] != side else x
        out[i : i + len(x)] = x.reshape(len(x), -1).numpy()
    return out


def nearest_neighbours(query: np.ndarray, reference: np.ndarray, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean nearest neighbour in `reference` of every row of `query`, in chunks.

    Returns:
        (distance float64 [N], index int64 [N]).
    """
    ref = torch.from_numpy(np.ascontiguousarray(reference, np.float32))
    dist, idx = [], []
    for i in range(0, len(query), chunk):
        q = torch.from_numpy(np.ascontiguousarray(query[i : i + chunk], np.float32))
        # Search with the fast matmul expansion, then recompute the winner's distance exactly: an exact copy must
        # come out as 0, not as rounding noise.
        j = torch.cdist(q, ref, compute_mode="use_mm_for_euclid_dist").argmin(dim=1)
        dist.append((q.double() - ref[j].double()).norm(dim=1).numpy())
        idx.append(j.numpy())
    return np.concatenate(dist), np.concatenate(idx)


def near_copies(synthetic_nn: np.ndarray, test_nn: np.ndarray, ratio: float) -> tuple[np.ndarray, float]:
    """Flag synthetic images much closer to a training image than real unseen images typically are.

    The reference is the median distance from each real *test* image to its nearest *train* image: how close a fresh
    patient's slice usually comes to the training set. A synthetic image is a near copy when its nearest-train distance
    is below ``ratio`` x that median.

    Returns:
        (boolean mask [N_synthetic], threshold).
    """
    if len(test_nn) == 0:
        raise ValueError("the memorization check needs real test images; the dataset's test split is empty")
    threshold = float(ratio * np.median(test_nn))
    return np.asarray(synthetic_nn) < threshold, threshold
