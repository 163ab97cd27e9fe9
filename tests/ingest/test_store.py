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


def test_streamed_parts_give_the_hash_of_the_whole(tmp_path):
    """Images appended as checked part files (the ingest path: a kernel copy plus the worker's digests) and as
    arrays, split anyhow, give the same file and content hash as one array."""
    from medgan.ingest.store import SliceWriter, checked_float16, image_digests, part_intact

    images = np.random.default_rng(1).uniform(-1, 1, (300, 1, 16, 16)).astype(np.float16)
    whole = write_dataset(tmp_path / "whole", images, _rows(300), ["a", "b"])
    parts = []
    for k, (a, b) in enumerate([(7, 7), (7, 160), (160, 300)]):  # the first part is empty
        path = tmp_path / f"part{k}.npy"
        np.save(path, checked_float16(images[a:b], a, path))
        parts.append((path, image_digests(images[a:b])))
        assert part_intact(path, parts[-1][1])
    assert not part_intact(parts[2][0], image_digests(images[161:301]))  # other content
    with SliceWriter(tmp_path / "streamed") as w:
        w.add(images[:3])
        w.add(images[3:7])
        for path, digests in parts:
            w.add_file(path, digests)
        streamed = w.finish(_rows(300), ["a", "b"])
    assert streamed["content_hash"] == whole["content_hash"]
    whole_bytes = (tmp_path / "whole" / "slices.npy").read_bytes()
    assert (tmp_path / "streamed" / "slices.npy").read_bytes() == whole_bytes
    ds = SliceDataset.open(tmp_path / "streamed")
    assert whole["content_hash"] == content_hash(
        ds.images, (tmp_path / "streamed" / "slices.csv").read_text(), ["a", "b"]
    )
    with pytest.raises(ValueError, match="matching its 140 digests"), SliceWriter(tmp_path / "bad") as w:
        w.add_file(parts[1][0], parts[2][1])  # 153 images, 140 digests


def test_leaving_the_writer_without_finish_writes_no_dataset(tmp_path):
    from medgan.ingest.store import SliceWriter

    with pytest.raises(RuntimeError, match="without finish"), SliceWriter(tmp_path / "ds") as w:
        w.add(np.zeros((2, 1, 8, 8), np.float16))
    assert not (tmp_path / "ds").exists()
