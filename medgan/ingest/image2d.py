"""2-D image sources (PNG, JPEG, BMP, TIFF): decode to one grey float32 plane; RGB-stored grey becomes luminance."""

from __future__ import annotations

from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# ITU-R BT.601 luma weights (what Pillow's convert("L") uses), applied in float to keep 16-bit precision.
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def is_image2d(path: Path) -> bool:
    """True for the 2-D image suffixes medgan reads."""
    return path.suffix.lower() in IMAGE_SUFFIXES


def read_image2d(path: str | Path) -> np.ndarray:
    """Read a 2-D image as grey float32 [rows, cols].

    Grey (L, I;16, I, F) is read as is; RGB/RGBA is converted to luminance (for grey stored as RGB this is the grey
    value); palette images go through their palette. Only the first frame of a multi-frame file is read.

    Args:
        path: a PNG/JPEG/BMP/TIFF file.

    Returns:
        float32 [rows, cols] in the file's own units (0..255 for 8-bit, 0..65535 for 16-bit).

    Raises:
        ValueError: the file cannot be decoded (truncated, not an image), naming the file.

    Example:
        >>> img = read_image2d("Training/glioma/Tr-glTr_0000.jpg")   # (224, 224) float32
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
                mode = im.mode
            if mode in ("LA", "PA"):
                im = im.getchannel(0)
                mode = "L"
            if mode in ("RGB", "RGBA", "RGBX", "CMYK", "YCbCr"):
                rgb = np.asarray(im.convert("RGB"), dtype=np.float32)
                return rgb @ LUMA
            if mode == "1":
                return np.asarray(im, dtype=np.float32)
            return np.asarray(im).astype(np.float32)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"{path.name}: not a decodable image ({e})") from None
