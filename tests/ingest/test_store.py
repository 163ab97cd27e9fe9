"""Slice-dataset store: the one-pass written hash equals a re-read of the files; range and NaN checks."""

from __future__ import annotations

import numpy as np
import pytest

from medgan.ingest.store import SliceDataset, content_hash, write_dataset


def _rows(n: int) -> list[dict]:
    return [
        {"split": ("train", "val", "test")[i % 3], "label": i % 2, "patient": f"p{i % 4}", "volume": "v",
         "slice_index": i, "position_mm": 0.5 * i, "spacing_mm": 1.0, "modality": "CT", "seed": ""}
        for i in range(n)
    ]  # fmt: skip


def test_written_hash_equals_hash_of_the_files(tmp_path):
    images = np.random.default_rng(0).uniform(-1, 1, (5000, 1, 16, 16)).astype(np.float32)  # > one 4096 chunk
    images[0, 0, 0, :2] = (-1.0, 1.0)
    info = write_dataset(tmp_path / "ds", images, _rows(5000), ["a", "b"])
    ds = SliceDataset.open(tmp_path / "ds")
    assert ds.images.dtype == np.float16
    np.testing.assert_array_equal(ds.images, images.astype(np.float16))
    csv_text = (tmp_path / "ds" / "slices.csv").read_text()
    assert info["content_hash"] == content_hash(np.asarray(ds.images), csv_text, ["a", "b"])
    again = write_dataset(tmp_path / "ds2", images.astype(np.float16), _rows(5000), ["a", "b"])
    assert again["content_hash"] == info["content_hash"]


@pytest.mark.parametrize("bad", [1.002, -1.5, np.nan, np.inf])
def test_values_outside_the_range_are_refused(tmp_path, bad):
    images = np.zeros((4, 1, 8, 8), np.float32)
    images[2, 0, 3, 3] = bad
    with pytest.raises(ValueError, match=r"images 0\.\.4 leave \[-1, 1\] or contain NaN"):
        write_dataset(tmp_path / "ds", images, _rows(4), ["a", "b"])
    assert not (tmp_path / "ds").exists()
