"""Image grids: slices in [-1, 1] tiled into one 8-bit picture (contact sheets, sample grids, near-copy pairs)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np


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
