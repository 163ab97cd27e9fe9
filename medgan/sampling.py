"""The one seed rule for (class, index) -> image, shared by `medgan evaluate` and `medgan export`.

Image ``index`` of class ``label`` is generated from seed ``base_seed + label * SEED_STRIDE + index``, in batches that
never straddle two classes and start at index 0 of their class. So a class's images do not depend on which other
classes are drawn, and the images an evaluation scores (``eval.seed``, ``eval.batch_size``) are bit for bit the ones an
export writes with the same seed and batch size (``export.seed``, ``export.batch_size``): an evaluation can be
reproduced from an export's ``seed`` column, and the reverse.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from medgan.models.generator import Generator

SEED_STRIDE = 1_000_000  # seeds of class c are base_seed + c * SEED_STRIDE + index, index < SEED_STRIDE


def image_seed(base_seed: int, label: int, index: int) -> int:
    """The generation seed of image `index` of class `label`: ``base_seed + label * SEED_STRIDE + index``.

    Example:
        >>> image_seed(0, 2, 7)
        2000007
    """
    if not 0 <= int(index) < SEED_STRIDE:
        raise ValueError(f"image index {index} is outside [0, {SEED_STRIDE}); draw fewer than {SEED_STRIDE} per class")
    return int(base_seed) + int(label) * SEED_STRIDE + int(index)


def class_batches(start: int, stop: int, batch_size: int) -> list[tuple[int, int]]:
    """Index ranges [a, b) of one class's images from `start` to `stop`, cut at multiples of `batch_size`.

    Cutting at multiples (not at `start`) keeps batch composition a function of the index alone, so images drawn in
    pieces (a filter drawing more seeds) equal the images drawn in one go.
    """
    if batch_size < 1:
        raise ValueError(f"batch size is {batch_size}; it must be >= 1")
    cuts = [start, *range((start // batch_size + 1) * batch_size, stop, batch_size), stop]
    return [(a, b) for a, b in zip(cuts, cuts[1:], strict=False) if b > a]


def sample_class(
    G: Generator, label: int, start: int, stop: int, base_seed: int, device: str = "cpu", batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Images ``start .. stop - 1`` of class `label` under the seed rule.

    Returns:
        (float32 [stop - start, 1, 128, 128] in [-1, 1], int64 seeds [stop - start]).
    """
    from medgan.models.generator import generate

    seeds = np.asarray([image_seed(base_seed, label, i) for i in range(start, stop)], dtype=np.int64)
    parts = [
        generate(G, np.full(b - a, label), seeds[a - start : b - start], device, batch_size)
        for a, b in class_batches(start, stop, batch_size)
    ]
    images = np.concatenate(parts) if parts else np.zeros((0, 1, 128, 128), np.float32)
    return images, seeds


def sample_classes(
    G: Generator, labels: Sequence[int], n_per_class: int, base_seed: int, device: str = "cpu", batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images ``0 .. n_per_class - 1`` of each class in `labels`, class-major.

    Returns:
        (images float32 [len(labels) * n_per_class, 1, 128, 128], labels int64, seeds int64).
    """
    out = [sample_class(G, int(c), 0, n_per_class, base_seed, device, batch_size) for c in labels]
    images = np.concatenate([x for x, _ in out])
    seeds = np.concatenate([s for _, s in out])
    return images, np.repeat(np.asarray(labels, dtype=np.int64), n_per_class), seeds
