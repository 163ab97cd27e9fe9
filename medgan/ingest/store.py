"""Ingest on disk: whether a part file written by a worker earlier still holds the images it was written with, and
what an ingest may replace at its output path."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medgan.dataset import checked_float16, image_digests
from medgan.io import read_json


def part_intact(path: Path, digests: bytes) -> bool:
    """Whether an ``.npy`` of images written earlier (an ingest part) still holds what `digests` says, in range."""
    try:
        images = np.load(path, mmap_mode="r")
        checked_float16(images, 0, path)
    except (OSError, ValueError):
        return False
    return images.dtype == np.float16 and image_digests(images) == digests


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse to replace anything but a slice dataset, and that only with `overwrite`."""
    if not out.exists() and not out.is_symlink():
        return
    if not overwrite:
        raise FileExistsError(f"--out {out} already exists; pass --overwrite to replace the dataset, or a new path")
    meta = out / "dataset.json"
    try:
        is_dataset = out.is_dir() and not out.is_symlink() and read_json(meta).get("schema", "").startswith("medgan.")
    except (OSError, ValueError, AttributeError):
        is_dataset = False
    if not is_dataset:
        raise ValueError(f"--out {out} exists and is not a medgan dataset (no dataset.json with a medgan schema); "
                         "--overwrite only replaces a dataset: pick a new path")  # fmt: skip
