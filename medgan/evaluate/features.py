"""The domain feature network: a small CNN classifier trained on the real train split, no downloaded weights.

Evaluation of medical synthetic data cannot lean on ImageNet/Inception features (no internet, and natural-image features
are a poor metric for grey-level anatomy), so medgan learns its own: a 4-block CNN trained to recognise the dataset's
classes on the real *train* split only (never val, test or synthetic images), validated on val. Its 128-d penultimate
features feed the distribution metrics (Frechet distance, KID, precision/recall, density/coverage); its class
probabilities give class fidelity. The same recipe trains the TSTR and TRTR classifiers, so "domain network" and "TRTR
classifier" coincide whenever their budgets match.

Networks are cached by dataset content hash and recipe hash in ``<cache_dir>/features/<hash>-<recipe>.pt`` (state_dict +
plain data, loaded with ``weights_only=True``); the cache is keyed by content, so any change to the pixels, labels or
recipe trains a new one.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from medgan.io import atomic_write_bytes

if TYPE_CHECKING:
    from medgan.dataset import SliceDataset

ARCH = "medgan.domain-cnn/3"  # bump when the architecture changes: old caches then miss instead of loading wrongly
FEATURE_DIM = 128


@dataclass(frozen=True)
class Recipe:
    """How a classifier is trained: the same recipe for the domain network, TRTR and TSTR.

    Attributes:
        epochs: passes over the *real train split*; TSTR trains for the same number of optimiser steps on
            synthetic data.
        batch_size: images per step.
        lr: peak learning rate of the one-cycle schedule (AdamW).
        weight_decay: AdamW weight decay.
        input_px: the 128 px slice is average-pooled to this side inside the network (64 px quarters the CPU cost).
        seed: weight init and data order.
        min_steps: at least this many steps, so small datasets still converge.
    """

    epochs: int = 15
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    input_px: int = 64
    seed: int = 0
    min_steps: int = 200

    def steps(self, n_images: int) -> int:
        """Optimiser steps for `epochs` passes over `n_images` (at least `min_steps`)."""
        return max(self.epochs * math.ceil(n_images / min(self.batch_size, n_images)), self.min_steps)

    def digest(self) -> str:
        """Short hash of the architecture and recipe (the cache key's second half)."""
        text = json.dumps({"arch": ARCH, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


class DomainNet(nn.Module):
    # A strided 4x4 stem (64 -> 32 px) then three conv-BN-ReLU-maxpool blocks (32 -> 16 -> 8 -> 4 px), 16 -> 128
    # channels. The strided stem instead of a full-resolution block and channels_last memory roughly halve the CPU cost.
    # The 4x4 map is flattened (not globally pooled) into the 128-d feature, so where the anatomy sits (laterality,
    # level) stays visible; a linear head gives the class logits.
    def __init__(self, num_classes: int, input_px: int = 64):
        super().__init__()
        self.num_classes, self.input_px = num_classes, input_px
        layers: list[nn.Module] = [nn.Conv2d(1, 16, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]
        cin = 16
        for cout in (32, 64, FEATURE_DIM):
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]
            cin = cout
        self.body = nn.Sequential(*layers)
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(FEATURE_DIM * (input_px // 16) ** 2, FEATURE_DIM), nn.ReLU())
        self.head = nn.Linear(FEATURE_DIM, num_classes)
        self.to(memory_format=torch.channels_last)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        assert x.ndim == 4 and x.shape[1] == 1, f"expected [B, 1, H, W], got {tuple(x.shape)}"
        if x.shape[-1] != self.input_px:
            x = F.adaptive_avg_pool2d(x, self.input_px)  # (B, 1, 64, 64)
        x = self.body(x.contiguous(memory_format=torch.channels_last))  # (B, 128, 4, 4)
        return self.embed(x)  # (B, 128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (B, C)


def fit_classifier(
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    recipe: Recipe,
    steps: int | None = None,
) -> DomainNet:
    """Train a fresh `DomainNet` with `recipe`.

    Args:
        images: [N, 1, H, W] in [-1, 1] (float16 or float32, memmaps welcome).
        labels: int [N] in [0, num_classes).
        num_classes: size of the head.
        recipe: the training recipe (seed fixes the init and the data order).
        steps: optimiser steps; default ``recipe.epochs`` passes over `images`. TSTR passes the TRTR step count so both
            classifiers get the same budget whatever the synthetic set's size.

    Returns:
        The trained network in eval mode, on the CPU.

    Raises:
        ValueError: empty input or labels outside the class range.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if len(images) == 0 or len(images) != len(labels):
        raise ValueError(
            f"need matching non-empty images and labels, got {len(images)} images and {len(labels)} labels"
        )
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must be in [0, {num_classes}), got {labels.min()}..{labels.max()}")
    bs = min(recipe.batch_size, len(images))
    steps = steps or recipe.steps(len(images))
    torch.manual_seed(recipe.seed)
    net = DomainNet(num_classes, recipe.input_px)
    # Pool to the network's input size once: the pooled copy is what every epoch reads.
    x_all = pooled(images, recipe.input_px)
    y_all = torch.from_numpy(labels)
    opt = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    # One-cycle: short budgets converge without tuning a schedule per dataset.
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=steps, pct_start=0.2)
    gen = torch.Generator().manual_seed(recipe.seed)
    order, pos = torch.randperm(len(x_all), generator=gen), 0
    net.train()
    for _ in range(steps):
        if pos + bs > len(order):
            order, pos = torch.randperm(len(x_all), generator=gen), 0
        idx = order[pos : pos + bs]
        pos += bs
        loss = F.cross_entropy(net(x_all[idx]), y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


def pooled(images: np.ndarray, side: int, chunk: int = 2048) -> torch.Tensor:
    """[N, 1, H, W] -> float32 tensor [N, 1, side, side] by area averaging, in chunks (memmaps stay on disk)."""
    out = torch.empty(len(images), 1, side, side)
    for i in range(0, len(images), chunk):
        x = torch.from_numpy(np.ascontiguousarray(images[i : i + chunk], dtype=np.float32))
        out[i : i + len(x)] = F.adaptive_avg_pool2d(x, side) if x.shape[-1] != side else x
    return out


@torch.no_grad()
def predict(net: DomainNet, images: np.ndarray, batch_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities and penultimate features.

    Returns:
        (probs float64 [N, C], features float64 [N, 128]).
    """
    net.eval()
    probs, feats = [], []
    for i in range(0, len(images), batch_size):
        x = pooled(images[i : i + batch_size], net.input_px)
        f = net.features(x)
        probs.append(F.softmax(net.head(f), dim=1).double().numpy())
        feats.append(f.double().numpy())
    c = net.num_classes
    return (
        np.concatenate(probs) if probs else np.zeros((0, c)),
        np.concatenate(feats) if feats else np.zeros((0, FEATURE_DIM)),
    )


def _save(net: DomainNet, info: dict, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(
        {"state_dict": net.state_dict(), "num_classes": net.num_classes, "input_px": net.input_px, "info": info}, buf
    )
    atomic_write_bytes(path, buf.getvalue())


def load_network(path: Path) -> tuple[DomainNet, dict]:
    """Load a cached network written by `real_classifier` (``weights_only=True``: state_dict + plain data)."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    net = DomainNet(int(blob["num_classes"]), int(blob["input_px"]))
    net.load_state_dict(blob["state_dict"])
    return net.eval(), dict(blob["info"])


def real_classifier(dataset: SliceDataset, recipe: Recipe, cache_dir: Path | None = None) -> tuple[DomainNet, dict]:
    """The classifier trained on the dataset's real train split with `recipe`, validated on val; cached.

    Used twice: as the domain feature network (``eval.feature_epochs``) and as the TRTR classifier
    (``eval.classifier_epochs``); with equal budgets both are the same cached file.

    Args:
        dataset: a real slice dataset with train and val rows.
        recipe: the training recipe.
        cache_dir: cache root (default ``~/.cache/medgan``); networks live in ``<cache_dir>/features/``.

    Returns:
        (network, info) with info keys ``val_accuracy``, ``val_balanced_accuracy``, ``n_train``, ``n_val``,
        ``steps``, ``train_seconds``, ``recipe``, ``dataset_hash``, ``cache_path``, ``cached``.

    Raises:
        ValueError: the dataset is synthetic or its train split is empty.
    """
    from sklearn.metrics import balanced_accuracy_score

    if dataset.synthetic:
        raise ValueError(f"{dataset.path}: the domain network is trained on real data; this dataset is synthetic")
    train_idx, val_idx = dataset.indices("train"), dataset.indices("val")
    if len(train_idx) == 0:
        raise ValueError(
            f"{dataset.path}: the train split is empty; re-ingest with split_fractions that give train rows"
        )
    cache_dir = Path(cache_dir) if cache_dir is not None else Path.home() / ".cache" / "medgan"
    path = cache_dir / "features" / f"{dataset.content_hash[:16]}-{recipe.digest()}.pt"
    if path.is_file():
        net, info = load_network(path)
        return net, {**info, "cache_path": str(path), "cached": True}
    labels = dataset.labels
    t0 = time.perf_counter()
    net = fit_classifier(dataset.images[train_idx], labels[train_idx], len(dataset.classes), recipe)
    info: dict = {
        "n_train": int(len(train_idx)),
        "n_val": int(len(val_idx)),
        "steps": recipe.steps(len(train_idx)),
        "train_seconds": round(time.perf_counter() - t0, 2),
        "recipe": asdict(recipe),
        "arch": ARCH,
        "dataset_hash": dataset.content_hash,
        "classes": dataset.classes,
        "val_accuracy": float("nan"),
        "val_balanced_accuracy": float("nan"),
    }
    if len(val_idx):
        probs, _ = predict(net, dataset.images[val_idx])
        pred = probs.argmax(1)
        info["val_accuracy"] = float((pred == labels[val_idx]).mean())
        info["val_balanced_accuracy"] = float(balanced_accuracy_score(labels[val_idx], pred))
    _save(net, info, path)
    return net, {**info, "cache_path": str(path), "cached": False}
