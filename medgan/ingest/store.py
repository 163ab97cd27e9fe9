"""The slice-dataset contract (schema ``medgan.slices/1``): the one writer and reader every stage shares.

A dataset folder holds ``dataset.json`` (metadata, counts, hashes, resolved config), ``slices.npy`` (float16
[N, 1, 128, 128] in [-1, 1]), ``slices.csv`` (one row per slice, pseudonymous keys only) and ``report.csv`` (one row per
input source: ok or skipped with a reason). Ingest writes it, export writes it with ``synthetic: true``; train, evaluate
and export read it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medgan import __version__
from medgan.io import atomic_dir, atomic_write_json, npy_header, read_json, sha256_array, sha256_array_header

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


def _csv_text(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n", extrasaction="raise")
    w.writeheader()
    for r in rows:
        w.writerow({c: _fmt(r.get(c, "")) for c in columns})
    return buf.getvalue()


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.6g}"
    return str(v)


def content_hash(images: np.ndarray, slices_csv: str, classes: Sequence[str]) -> str:
    """SHA-256 over the pixels, the slice table and the class list: equal inputs give equal hashes."""
    return sha256_array(images, _table_hash(slices_csv, classes)).hexdigest()


def _table_hash(slices_csv: str, classes: Sequence[str]) -> Any:
    """The content hash fed with everything but the pixels (which `sha256_array` appends)."""
    h = hashlib.sha256(SCHEMA.encode())
    h.update(("\x1f".join(classes)).encode())
    h.update(slices_csv.encode())
    return h


def _checked_float16(chunk: np.ndarray, first: int, out: Path) -> np.ndarray:
    """`chunk` as contiguous float16 (the stored type), after checking every value is in [-1, 1] and not NaN.

    The check reads the float16 bits: |x| <= 1 exactly when the bits without the sign are <= 0x3C00 (1.0), and NaN
    and inf lie above it. One integer pass instead of three float32 reductions.
    """
    c16 = np.ascontiguousarray(chunk, dtype=np.float16)
    if c16.size and int((c16.view(np.uint16) & 0x7FFF).max()) > 0x3C00:
        raise ValueError(f"{out}: images {first}..{first + len(c16)} leave [-1, 1] or contain NaN")
    return c16


def write_dataset(
    out: str | Path,
    images: np.ndarray | Iterable[np.ndarray],
    rows: Sequence[dict[str, Any]],
    classes: Sequence[str],
    meta: dict[str, Any] | None = None,
    report: Sequence[dict[str, Any]] | None = None,
    extra_files: dict[str, bytes] | None = None,
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
    pieces = iter(images)
    first = next(pieces, None)
    if first is None:
        raise ValueError(f"{out}: no images")
    pieces = itertools.chain([first], pieces)
    if first.ndim != 4 or first.shape[1] != 1 or first.shape[2] != first.shape[3]:
        raise ValueError(f"{out}: images must be [N, 1, R, R], got {tuple(first.shape)}")
    shape = (len(rows), *first.shape[1:])
    rows = [dict(r, row=i) for i, r in enumerate(rows)]
    for r in rows:
        if r.get("split") not in SPLITS:
            raise ValueError(f"{out}: row {r['row']} has split {r.get('split')!r}; expected one of {SPLITS}")
        if not 0 <= int(r["label"]) < len(classes):
            raise ValueError(f"{out}: row {r['row']} has label {r['label']} but there are {len(classes)} classes")
        r.setdefault("class_name", classes[int(r["label"])])
    slices_csv = _csv_text(COLUMNS, rows)
    counts: dict[str, dict[str, int]] = {s: dict.fromkeys(classes, 0) for s in SPLITS}
    for (split, label), n in Counter((r["split"], int(r["label"])) for r in rows).items():
        counts[split][classes[label]] = n
    with atomic_dir(out) as tmp:
        # Check, write and hash each piece in one pass (the same bytes `content_hash` reads back from the file),
        # with plain writes: a memory-mapped output costs a page fault per 4 KB on this path.
        h = sha256_array_header(np.float16, shape, _table_hash(slices_csv, classes))
        k = 0
        with open(tmp / "slices.npy", "wb") as f:
            f.write(npy_header(np.float16, shape))
            for piece in pieces:
                if piece.shape[1:] != shape[1:]:
                    raise ValueError(f"{out}: images must be [N, 1, R, R] of one size, got {tuple(piece.shape)}")
                chunk = _checked_float16(piece, k, out)
                f.write(memoryview(chunk).cast("B"))
                h.update(memoryview(chunk).cast("B"))
                k += len(chunk)
            f.flush()
            os.fsync(f.fileno())
        if k != len(rows):
            raise ValueError(f"{out}: {k} images but {len(rows)} rows")
        digest = h.hexdigest()
        (tmp / "slices.csv").write_text(slices_csv)
        (tmp / "report.csv").write_text(_csv_text(REPORT_COLUMNS, report or []))
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        info = {
            "schema": SCHEMA,
            "name": out.name,
            "resolution": int(shape[-1]),
            "value_range": [-1, 1],
            "classes": list(classes),
            "n_slices": len(rows),
            "counts": counts,
            "content_hash": digest,
            "synthetic": False,
            "medgan_version": __version__,
            **(meta or {}),
        }
        atomic_write_json(tmp / "dataset.json", info)
    return info


@dataclass
class SliceDataset:
    """A slice dataset opened for reading; pixels stay memory-mapped.

    Example:
        >>> ds = SliceDataset.open("datasets/brain")
        >>> x = ds.images[ds.indices("train")]    # float16 [n, 1, 128, 128]
        >>> y = ds.labels[ds.indices("train")]    # int64 [n]
    """

    path: Path
    meta: dict[str, Any]
    images: np.ndarray
    table: list[dict[str, str]]

    @classmethod
    def open(cls, path: str | Path) -> SliceDataset:
        """Open a dataset folder written by `write_dataset`.

        Raises:
            FileNotFoundError: the folder or one of its files is missing (an unfinished ``.partial`` is named).
            ValueError: the schema or shapes do not match ``medgan.slices/1``.
        """
        path = Path(path)
        if not (path / "dataset.json").is_file():
            hint = (
                f" ({path}.partial exists: the ingest was interrupted; rerun it to resume)"
                if Path(f"{path}.partial").exists()
                else ""
            )
            raise FileNotFoundError(f"{path} is not a medgan dataset: dataset.json missing{hint}")
        meta = read_json(path / "dataset.json")
        if meta.get("schema") != SCHEMA:
            raise ValueError(f"{path}: schema {meta.get('schema')!r}, expected {SCHEMA!r}")
        images = np.load(path / "slices.npy", mmap_mode="r")
        with open(path / "slices.csv", newline="") as f:
            table = list(csv.DictReader(f))
        if len(table) != len(images):
            raise ValueError(f"{path}: slices.npy has {len(images)} slices but slices.csv has {len(table)} rows")
        return cls(path=path, meta=meta, images=images, table=table)

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def content_hash(self) -> str:
        return str(self.meta["content_hash"])

    @property
    def synthetic(self) -> bool:
        return bool(self.meta.get("synthetic", False))

    @property
    def labels(self) -> np.ndarray:
        return np.array([int(r["label"]) for r in self.table], dtype=np.int64)

    @property
    def splits(self) -> np.ndarray:
        return np.array([r["split"] for r in self.table])

    def column(self, name: str) -> list[str]:
        return [r[name] for r in self.table]

    def geometry(self) -> dict[str, Any]:
        """Typical in-plane ``spacing_mm`` (median over slices; None if unknown) and the most common ``modality``."""
        spacing = [float(v) for v in self.column("spacing_mm") if v not in ("", None)]
        modalities = Counter(m for m in self.column("modality") if m)
        return {
            "spacing_mm": float(np.median(spacing)) if spacing else None,
            "modality": modalities.most_common(1)[0][0] if modalities else "",
        }

    def indices(self, split: str | None = None) -> np.ndarray:
        """Row indices of one split (all rows when `split` is None)."""
        if split is None:
            return np.arange(len(self.table))
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is not one of {SPLITS}")
        return np.flatnonzero(self.splits == split)

    def __len__(self) -> int:
        return len(self.table)
