"""Ingest parts on disk: whether a part file written by a worker earlier still holds the images it was written with."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medgan.dataset import checked_float16, image_digests


def part_intact(path: Path, digests: bytes) -> bool:
    """Whether an ``.npy`` of images written earlier (an ingest part) still holds what `digests` says, in range."""
    try:
        images = np.load(path, mmap_mode="r")
        checked_float16(images, 0, path)
    except (OSError, ValueError):
        return False
    return images.dtype == np.float16 and image_digests(images) == digests
