"""`medgan info`: a text table of a slice dataset (counts per split and class, schema, hash) and a contact sheet PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medgan.ingest.store import SPLITS, SliceDataset
from medgan.viz import image_grid, save_png


def describe(ds: SliceDataset) -> str:
    """A table of slice counts per split x class, plus schema, size, content hash and whether it is synthetic.

    Example:
        >>> print(describe(SliceDataset.open("datasets/brain")))
    """
    classes = ds.classes
    labels, splits = ds.labels, ds.splits
    width = max(8, *(len(c) for c in classes)) if classes else 8
    meta = ds.meta
    lines = [
        f"dataset: {ds.path}",
        f"schema {meta.get('schema')}, {len(ds)} slices at {meta.get('resolution')}x{meta.get('resolution')}, "
        f"{len(classes)} classes, synthetic: {str(ds.synthetic).lower()}",
        f"content hash: {ds.content_hash}",
    ]
    norm = meta.get("normalization")
    if isinstance(norm, dict) and norm.get("used"):
        lines.append("normalization: " + "; ".join(norm["used"]))
    if ds.synthetic and meta.get("generator"):
        lines.append(f"generator: {meta['generator']}")
    lines.append(f"{'split':<6} " + " ".join(f"{c:>{width}}" for c in classes) + f" {'total':>8}")
    for split in SPLITS:
        in_split = labels[splits == split]
        counts = np.bincount(in_split, minlength=len(classes))
        lines.append(f"{split:<6} " + " ".join(f"{int(n):>{width}}" for n in counts) + f" {len(in_split):>8}")
    totals = np.bincount(labels, minlength=len(classes)) if len(labels) else np.zeros(len(classes), int)
    lines.append(f"{'all':<6} " + " ".join(f"{int(n):>{width}}" for n in totals) + f" {len(labels):>8}")
    patients = {r.get("patient", "") for r in ds.table} - {""}
    if patients:
        lines.append(f"patients (pseudonymous): {len(patients)}")
    return "\n".join(lines)


def contact_sheet(ds: SliceDataset, path: str | Path, per_class: int = 8) -> Path:
    """Write a PNG grid with one row per class (in class order) of up to `per_class` slices spread evenly over it.

    Rows of classes with fewer slices are padded with black tiles; a class with none is a black row.

    Args:
        ds: an opened slice dataset.
        path: the PNG to write.
        per_class: slices per row (>= 1).

    Returns:
        The path written.

    Raises:
        ValueError: `per_class` < 1 or the dataset has no classes.
    """
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    if not ds.classes:
        raise ValueError(f"{ds.path} has no classes to show")
    res = int(ds.images.shape[-1]) if len(ds) else int(ds.meta.get("resolution", 128))
    labels = ds.labels
    tiles = np.full((len(ds.classes) * per_class, 1, res, res), -1.0, dtype=np.float32)
    for c in range(len(ds.classes)):
        idx = np.flatnonzero(labels == c)
        if len(idx):
            pick = idx[np.unique(np.linspace(0, len(idx) - 1, min(per_class, len(idx))).round().astype(int))]
            tiles[c * per_class : c * per_class + len(pick)] = ds.images[np.sort(pick)]
    return save_png(image_grid(tiles, ncol=per_class), path)
