"""The slice dataset's schema: its name, splits and table columns, the content hash and the stored pixel check."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medgan.io import sha256_array_header

SCHEMA = "medgan.slices/1"
SPLITS = ("train", "val", "test")
COLUMNS = (
    "row",
    "split",
    "label",
    "class_name",
    "patient",
    "volume",
    "slice_index",
    "position_mm",
    "spacing_mm",
    "modality",
    "seed",
)
REPORT_COLUMNS = ("manifest_row", "source", "status", "reason", "n_slices")
# How `SliceDataset` types the table's columns; every other column is text. An empty cell reads -1 / NaN.
INT_COLUMNS = ("row", "label", "slice_index", "seed")
FLOAT_COLUMNS = ("position_mm", "spacing_mm")


def content_hash(images: np.ndarray, slices_csv: str, classes: Sequence[str]) -> str:
    """SHA-256 over the slice table, the class list, the images' dtype and shape, and the SHA-256 of each image's
    float16 bytes (`image_digests`): equal inputs give equal hashes.

    Hashing image by image makes the hash independent of how the images were produced or split into pieces, so
    ingest workers hash the slices they make, in parallel, and the parent only combines the 32-byte digests.
    """
    digests = hashlib.sha256()
    for i in range(0, len(images), 4096):  # pieces: a memory-mapped dataset stays out of RAM
        digests.update(image_digests(images[i : i + 4096]))
    return _content_digest(slices_csv, classes, tuple(np.shape(images)), digests.digest())


def image_digests(images: np.ndarray) -> bytes:
    """The SHA-256 of each image's float16 bytes (C order), concatenated: 32 bytes per image."""
    c16 = np.ascontiguousarray(images, dtype=np.float16)
    return b"".join(hashlib.sha256(memoryview(img).cast("B")).digest() for img in c16)


def _content_digest(slices_csv: str, classes: Sequence[str], shape: tuple[int, ...], digests: bytes) -> str:
    h = hashlib.sha256(SCHEMA.encode())
    h.update(("\x1f".join(classes)).encode())
    h.update(slices_csv.encode())
    sha256_array_header(np.float16, tuple(shape), h)
    h.update(digests)  # the SHA-256 of the concatenated per-image digests
    return h.hexdigest()


def checked_float16(images: np.ndarray, first: int, where: str | Path) -> np.ndarray:
    """`images` as contiguous float16 (the stored type), after checking every value is in [-1, 1] and not NaN.

    The check reads the float16 bits: |x| <= 1 exactly when the bits without the sign are <= 0x3C00 (1.0), and NaN
    and inf lie above it. One integer pass instead of three float32 reductions.

    Raises:
        ValueError: a value outside [-1, 1], NaN or inf, naming `where` and the images ``first..first + n``.
    """
    c16 = np.ascontiguousarray(images, dtype=np.float16)
    if c16.size and int((c16.view(np.uint16) & 0x7FFF).max()) > 0x3C00:
        raise ValueError(f"{where}: images {first}..{first + len(c16)} leave [-1, 1] or contain NaN")
    return c16
