"""The slice dataset reader: `SliceDataset` opens a folder, its pixels memory-mapped and its table typed."""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from medgan.dataset.schema import COLUMNS, FLOAT_COLUMNS, INT_COLUMNS, SCHEMA, SPLITS
from medgan.io import read_json


def _typed(path: Path, name: str, cells: Sequence[str]) -> np.ndarray:
    """One column of ``slices.csv`` as numpy: int64 (`INT_COLUMNS`, empty = -1), float64 (`FLOAT_COLUMNS`,
    empty = NaN) or text."""
    try:
        if name in INT_COLUMNS:
            return np.fromiter((int(v) if v else -1 for v in cells), np.int64, len(cells))
        if name in FLOAT_COLUMNS:
            return np.fromiter((float(v) if v else np.nan for v in cells), np.float64, len(cells))
    except ValueError as e:
        raise ValueError(f"{path}/slices.csv: column {name!r} must hold numbers ({e}); rewrite the dataset") from e
    return np.asarray(cells, dtype=str)


def _read_table(path: Path) -> dict[str, np.ndarray]:
    """``slices.csv`` parsed once into one typed array per column (`COLUMNS` always present)."""
    with open(path / "slices.csv", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        cells = list(reader)
    bad = next((i for i, r in enumerate(cells) if len(r) != len(header)), None)
    if bad is not None:
        raise ValueError(
            f"{path}/slices.csv: row {bad} has {len(cells[bad])} cells, the header {len(header)}; rewrite the dataset"
        )
    by_name = dict(zip(header, zip(*cells, strict=True), strict=False)) if cells else dict.fromkeys(header, ())
    n = len(cells)
    del cells
    return {name: _typed(path, name, by_name.get(name, ("",) * n)) for name in dict.fromkeys([*COLUMNS, *header])}


@dataclass
class SliceDataset:
    """A slice dataset opened for reading: pixels memory-mapped, the table parsed once into typed columns.

    Example:
        >>> ds = SliceDataset.open("datasets/brain")
        >>> x = ds.images[ds.indices("train")]    # float16 [n, 1, 128, 128]
        >>> y = ds.labels[ds.indices("train")]    # int64 [n]
        >>> ds.column("spacing_mm")               # float64 [N], NaN where unknown
    """

    path: Path
    meta: dict[str, Any]
    images: np.ndarray
    columns: dict[str, np.ndarray]

    @classmethod
    def open(cls, path: str | Path) -> SliceDataset:
        """Open a dataset folder written by `write_dataset`.

        Raises:
            FileNotFoundError: the folder or one of its files is missing (an unfinished ``.partial`` is named).
            ValueError: the schema, shapes or table do not match ``medgan.slices/1``.
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
        columns = _read_table(path)
        if len(columns["row"]) != len(images):
            raise ValueError(
                f"{path}: slices.npy has {len(images)} slices but slices.csv has {len(columns['row'])} rows"
            )
        return cls(path=path, meta=meta, images=images, columns=columns)

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
    def labels(self) -> npt.NDArray[np.int64]:
        """The class index of each slice, int64 [N]."""
        return self.columns["label"]

    @property
    def splits(self) -> np.ndarray:
        """The split of each slice (``train`` | ``val`` | ``test``), text [N]."""
        return self.columns["split"]

    def column(self, name: str) -> np.ndarray:
        """One column of the table: int64 for `INT_COLUMNS` (-1 where empty), float64 for `FLOAT_COLUMNS` (NaN where
        empty), text otherwise.

        Raises:
            KeyError: `name` is not a column, listing the columns.
        """
        if name not in self.columns:
            raise KeyError(f"{self.path}/slices.csv has no column {name!r}; columns: {list(self.columns)}")
        return self.columns[name]

    def rows(self) -> list[dict[str, Any]]:
        """The table as one dict per slice (built on each call: for small datasets and tests; use `column`)."""
        names, values = list(self.columns), [c.tolist() for c in self.columns.values()]
        return [dict(zip(names, r, strict=True)) for r in zip(*values, strict=True)]

    def geometry(self) -> dict[str, Any]:
        """Typical in-plane ``spacing_mm`` (median over slices; None if unknown) and the most common ``modality``."""
        spacing = self.columns["spacing_mm"]
        spacing = spacing[np.isfinite(spacing)]
        modalities = Counter(m for m in self.columns["modality"].tolist() if m)
        return {
            "spacing_mm": float(np.median(spacing)) if len(spacing) else None,
            "modality": modalities.most_common(1)[0][0] if modalities else "",
        }

    def indices(self, split: str | None = None) -> np.ndarray:
        """Row indices of one split (all rows when `split` is None)."""
        if split is None:
            return np.arange(len(self))
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is not one of {SPLITS}")
        return np.flatnonzero(self.splits == split)

    def __len__(self) -> int:
        return len(self.columns["row"])
