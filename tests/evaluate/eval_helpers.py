"""Tiny separable slice datasets for the evaluate tests (bright blob left vs right, with noise)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medgan.dataset import write_dataset

CLASSES = ["left", "right"]


def patterns(labels: np.ndarray, seed: int) -> np.ndarray:
    """Class 0: a bright blob in the left half; class 1: in the right half; random position, size and noise."""
    rng = np.random.default_rng(seed)
    out = np.full((len(labels), 1, 128, 128), -0.8, dtype=np.float32)
    for i, y in enumerate(labels):
        r, s = rng.integers(10, 80), rng.integers(20, 40)
        c = rng.integers(4, 64 - s) + 64 * int(y)
        out[i, 0, r : r + s, c : c + s] = rng.uniform(0.3, 0.9)
    out += rng.normal(0, 0.15, out.shape).astype(np.float32)
    return np.clip(out, -1, 1)


def make_dataset(
    path: Path, per_split: dict[str, int], seed: int = 0, synthetic: bool = False, classes=CLASSES
) -> Path:
    rows, labels = [], []
    for split, n in per_split.items():
        for i in range(2 * n):
            rows.append(
                {
                    "split": split,
                    "label": i % len(classes),
                    "patient": f"p{split}{i}",
                    "volume": f"v{split}{i}",
                    "slice_index": 0,
                    "position_mm": 0.0,
                    "spacing_mm": 1.0,
                    "modality": "MR",
                    "seed": "",
                }
            )
            labels.append(i % len(classes))
    write_dataset(path, patterns(np.array(labels), seed), rows, classes, meta={"synthetic": synthetic})
    return path
