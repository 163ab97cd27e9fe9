"""The slice dataset writer: `SliceWriter` streams images then the tables; `write_dataset` writes one in a call."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib import format as npformat

from medgan import __version__
from medgan.dataset.schema import (
    COLUMNS,
    REPORT_COLUMNS,
    SCHEMA,
    SPLITS,
    _content_digest,
    checked_float16,
    image_digests,
)
from medgan.io import append_file, atomic_dir, atomic_write_json, npy_header, write_all


def _csv_text(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    """The rows as CSV text with `columns` (a key outside them raises ValueError, as ``csv.DictWriter`` would)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    known = frozenset(columns)
    for r in rows:
        if not known.issuperset(r):
            raise ValueError(f"dict contains fields not in fieldnames: {sorted(set(r) - known)}")
        w.writerow([_fmt(r.get(c, "")) for c in columns])
    return buf.getvalue()


def _fmt(v: Any) -> str:
    kind = type(v)
    if kind is str:
        return v
    if kind is int:
        return str(v)
    if v is None:
        return ""
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.6g}"
    return str(v)


def _checked_rows(out: Path, rows: Sequence[dict[str, Any]], classes: Sequence[str]) -> list[dict[str, Any]]:
    """The rows numbered in order (``row``) with ``class_name`` filled in; a bad split or label raises, naming it."""
    checked = []
    for i, r in enumerate(rows):
        if r.get("split") not in SPLITS:
            raise ValueError(f"{out}: row {i} has split {r.get('split')!r}; expected one of {SPLITS}")
        if not 0 <= int(r["label"]) < len(classes):
            raise ValueError(f"{out}: row {i} has label {r['label']} but there are {len(classes)} classes")
        checked.append({"class_name": classes[int(r["label"])], **r, "row": i})
    return checked


class SliceWriter:
    """Write a slice dataset in two steps: the images as they come, then the tables (the `write_dataset` contract).

    `add` checks each piece of images, appends it to ``<out>.partial/slices.npy`` and hashes it, so a caller can
    stream images while it is still producing the rest (ingest writes each finished part while the workers read the
    next volumes). `finish` writes the tables and metadata with the content hash, and the folder is renamed to `out`
    when the block ends. Leaving the block without `finish` (an error) keeps ``<out>.partial`` and writes no dataset.

    With ``atomic=False`` the files go straight into `out`, for a caller that builds `out` inside its own atomic
    folder (an export writes its images and the dataset into one ``.partial``, renamed once).

    Args:
        out: the dataset folder.
        atomic: build in ``<out>.partial`` and rename when complete (default), or write into `out` as it is.

    Example:
        >>> with SliceWriter("datasets/ct") as w:
        ...     for part in parts:
        ...         w.add(part)
        ...     info = w.finish(rows, ["liver", "kidney"])
    """

    def __init__(self, out: str | Path, *, atomic: bool = True):
        self.out = Path(out)
        self.atomic = atomic
        self.n = 0  # images added so far
        self._resolution = 0
        self._header = 0
        self._pixels = hashlib.sha256()
        self._file: Any = None
        self._info: dict[str, Any] | None = None

    def __enter__(self) -> SliceWriter:
        self._ctx: Any = atomic_dir(self.out) if self.atomic else contextlib.nullcontext(self.out)
        self._dir = self._ctx.__enter__()
        self._dir.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, *exc: Any) -> bool | None:
        if self._file is not None:
            self._file.close()
        if exc[0] is None and self._info is None:
            err = RuntimeError(f"{self.out}: SliceWriter left without finish(); the dataset was not written")
            self._ctx.__exit__(RuntimeError, err, None)
            raise err
        return self._ctx.__exit__(*exc)

    def _open(self, resolution: int) -> None:
        self._resolution = resolution
        # The header's length does not depend on N (npy pads it to 64 bytes): reserve it, fill it in at finish.
        self._header = len(npy_header(np.float16, (10**12, 1, resolution, resolution)))
        self._file = open(self._dir / "slices.npy", "wb", buffering=0)  # noqa: SIM115 (closed in finish / __exit__)
        write_all(self._file, b"\0" * self._header)

    def _check_shape(self, shape: tuple[int, ...]) -> None:
        if len(shape) != 4 or shape[1] != 1 or shape[2] != shape[3]:
            raise ValueError(f"{self.out}: images must be [N, 1, R, R], got {shape}")
        if self._file is None:
            self._open(int(shape[-1]))
        elif shape[-1] != self._resolution:
            raise ValueError(f"{self.out}: images must be [N, 1, R, R] of one size, got {shape}")

    def add(self, images: np.ndarray) -> None:
        """Check (shape, float16 range), append and hash a piece of images [n, 1, R, R]."""
        self._check_shape(tuple(images.shape))
        chunk = checked_float16(images, self.n, self.out)
        # Plain writes: a memory-mapped output costs a page fault per 4 KB on this path.
        write_all(self._file, memoryview(chunk).cast("B"))
        self._pixels.update(image_digests(chunk))
        self.n += len(chunk)

    def add_file(self, path: Path, digests: bytes) -> None:
        """Append the images of a float16 ``.npy`` file already checked by `checked_float16` and hashed by
        `image_digests` (an ingest part, made by a worker): a kernel-side copy, nothing read into Python."""
        with open(path, "rb") as src:
            version = npformat.read_magic(src)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f"{path}: unsupported .npy version {version}")
            read_header = npformat.read_array_header_1_0 if version == (1, 0) else npformat.read_array_header_2_0
            shape, fortran, dtype = read_header(src)
            offset = src.tell()
        if dtype != np.float16 or fortran or len(digests) != 32 * shape[0]:
            raise ValueError(f"{path}: not a float16 C-order image part matching its {len(digests) // 32} digests")
        self._check_shape(tuple(shape))
        append_file(self._file, path, offset, int(np.prod(shape)) * 2)
        self._pixels.update(digests)
        self.n += int(shape[0])

    def finish(
        self,
        rows: Sequence[dict[str, Any]],
        classes: Sequence[str],
        meta: dict[str, Any] | None = None,
        report: Sequence[dict[str, Any]] | None = None,
        extra_files: dict[str, bytes] | None = None,
    ) -> dict[str, Any]:
        """Write the tables, the metadata and the content hash for the images added; see `write_dataset`."""
        if self._file is None:
            raise ValueError(f"{self.out}: no images")
        if self.n != len(rows):
            raise ValueError(f"{self.out}: {self.n} images but {len(rows)} rows")
        rows = _checked_rows(self.out, rows, classes)
        shape = (self.n, 1, self._resolution, self._resolution)
        header = npy_header(np.float16, shape)
        assert len(header) == self._header, "npy header length changed"  # noqa: S101 (fixed by the format)
        self._file.seek(0)
        write_all(self._file, header)
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        slices_csv = _csv_text(COLUMNS, rows)
        counts: dict[str, dict[str, int]] = {s: dict.fromkeys(classes, 0) for s in SPLITS}
        for (split, label), n in Counter((r["split"], int(r["label"])) for r in rows).items():
            counts[split][classes[label]] = n
        (self._dir / "slices.csv").write_text(slices_csv)
        (self._dir / "report.csv").write_text(_csv_text(REPORT_COLUMNS, report or []))
        for name, data in (extra_files or {}).items():
            (self._dir / name).write_bytes(data)
        info = {
            "schema": SCHEMA,
            "name": self.out.name,
            "resolution": self._resolution,
            "value_range": [-1, 1],
            "classes": list(classes),
            "n_slices": self.n,
            "counts": counts,
            "content_hash": _content_digest(slices_csv, classes, shape, self._pixels.digest()),
            "synthetic": False,
            "medgan_version": __version__,
            **(meta or {}),
        }
        atomic_write_json(self._dir / "dataset.json", info)
        self._info = info
        return info


def write_dataset(
    out: str | Path,
    images: np.ndarray | Iterable[np.ndarray],
    rows: Sequence[dict[str, Any]],
    classes: Sequence[str],
    meta: dict[str, Any] | None = None,
    report: Sequence[dict[str, Any]] | None = None,
    extra_files: dict[str, bytes] | None = None,
    *,
    atomic: bool = True,
) -> dict[str, Any]:
    """Write a slice dataset atomically (built in ``<out>.partial/``, renamed when complete).

    Args:
        out: the dataset folder to create or replace.
        images: float16-convertible array [N, 1, R, R] with values in [-1, 1], or an iterable of such arrays that
            concatenate to it (e.g. ingest parts loaded one at a time, so the whole set is never in memory).
        rows: N dicts with the `COLUMNS` keys (``row`` is filled in); ``label`` indexes `classes`.
        classes: class names, index = label.
        meta: extra ``dataset.json`` fields (normalization, source manifest hash, resolved config, synthetic, ...).
        report: per-source ingest rows (`REPORT_COLUMNS`).
        extra_files: more files to place in the folder (e.g. a contact sheet), name -> bytes.
        atomic: False writes into `out` directly, for a caller whose `out` is already inside its own atomic folder.

    Returns:
        The ``dataset.json`` content.

    Raises:
        ValueError: shapes, value range or labels that break the contract, naming which.
    """
    out = Path(out)
    if isinstance(images, np.ndarray):
        if len(rows) != len(images):
            raise ValueError(f"{out}: {len(images)} images but {len(rows)} rows")
        images = [images[i : i + 4096] for i in range(0, len(images), 4096)] or [images]  # views, no copies
    _checked_rows(out, rows, classes)  # before any pixel is written
    with SliceWriter(out, atomic=atomic) as w:
        for piece in images:
            w.add(piece)
        return w.finish(rows, classes, meta=meta, report=report, extra_files=extra_files)
