"""Image grids: slices in [-1, 1] tiled into one 8-bit picture (contact sheets, sample grids, near-copy pairs)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from medgan.dataset import SliceDataset


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Map values in [-1, 1] to 0..255 (clipped), the documented 8-bit display mapping."""
    return np.clip(np.rint((np.asarray(images, dtype=np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray, ncol: int, pad: int = 2) -> np.ndarray:
    """Tile [N, 1, H, W] (or [N, H, W]) images in [-1, 1] into one uint8 [rows*H, ncol*W] grid, row-major.

    Example:
        >>> grid = image_grid(np.zeros((8, 1, 128, 128)), ncol=4)   # (2*130+2, 4*130+2)
    """
    x = np.asarray(images, dtype=np.float32)
    if x.ndim == 4:
        x = x[:, 0]
    n, h, w = x.shape
    ncol = max(1, min(ncol, n)) if n else 1
    nrow = max(1, -(-n // ncol))
    grid = np.zeros((nrow * (h + pad) + pad, ncol * (w + pad) + pad), dtype=np.uint8)
    for i, img in enumerate(to_uint8(x)):
        r, c = divmod(i, ncol)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = img
    return grid


def png_bytes(image: np.ndarray) -> bytes:
    """Encode a uint8 grayscale (or RGB) array as PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def save_png(image: np.ndarray, path: str | Path) -> Path:
    """Write a uint8 array as a PNG atomically."""
    from medgan.io import atomic_write_bytes

    return atomic_write_bytes(path, png_bytes(image))


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


def health_figure(history: list[dict[str, float]], path: str | Path) -> Path:
    """The run's health at a glance: losses, D's probabilities and accuracies, r_t and augmentation p against kimg.

    Args:
        history: one dict per log interval with ``kimg`` and the training metrics (``loss/d``, ``d/acc_real``, ...).
        path: the PNG to write.

    Returns:
        The written path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kimg = [h["kimg"] for h in history]
    panels = [
        ("losses", ("loss/d", "loss/g")),
        ("D(x) as probabilities", ("d/prob_real", "d/prob_fake")),
        ("D accuracy (overpowering when both -> 1)", ("d/acc_real", "d/acc_fake")),
        ("overfitting heuristic r_t and augmentation p", ("d/r_t", "aug/p")),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), constrained_layout=True)
    for ax, (title, keys) in zip(axes, panels, strict=True):
        for k in keys:
            ax.plot(kimg, [h.get(k, float("nan")) for h in history], label=k)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("kimg")
        ax.legend(fontsize=8)
    axes[0].set_yscale("log")  # D loss collapsing toward 1e-4 is the classic failure: show it on a log axis
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    from medgan.io import atomic_write_bytes

    return atomic_write_bytes(path, buf.getvalue())
