"""The slice dataset: the one-pass written hash equals a re-read of the files; range and NaN checks; typed columns;
writing into a caller's atomic folder; reading it needs neither pydicom nor nibabel."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from medgan.dataset import SliceDataset, SliceWriter, checked_float16, content_hash, image_digests, write_dataset


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
    images = np.random.default_rng(1).uniform(-1, 1, (300, 1, 16, 16)).astype(np.float16)
    whole = write_dataset(tmp_path / "whole", images, _rows(300), ["a", "b"])
    parts = []
    for k, (a, b) in enumerate([(7, 7), (7, 160), (160, 300)]):  # the first part is empty
        path = tmp_path / f"part{k}.npy"
        np.save(path, checked_float16(images[a:b], a, path))
        parts.append((path, image_digests(images[a:b])))
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
    with pytest.raises(RuntimeError, match="without finish"), SliceWriter(tmp_path / "ds") as w:
        w.add(np.zeros((2, 1, 8, 8), np.float16))
    assert not (tmp_path / "ds").exists()


def test_the_table_is_read_into_typed_columns(tmp_path):
    rows = _rows(6)
    rows[1]["spacing_mm"], rows[2]["position_mm"], rows[3]["seed"] = "", "", 17
    write_dataset(tmp_path / "ds", np.zeros((6, 1, 8, 8), np.float16), rows, ["a", "b"])
    ds = SliceDataset.open(tmp_path / "ds")
    assert ds.labels.dtype == np.int64 and ds.labels.tolist() == [0, 1, 0, 1, 0, 1]
    assert ds.splits.tolist() == ["train", "val", "test"] * 2
    assert ds.column("row").tolist() == list(range(6)) and ds.column("slice_index").tolist() == list(range(6))
    assert ds.column("seed").tolist() == [-1, -1, -1, 17, -1, -1]  # empty cells read -1
    spacing, position = ds.column("spacing_mm"), ds.column("position_mm")
    assert spacing.dtype == np.float64 and np.isnan(spacing[1]) and spacing[0] == 1.0
    assert np.isnan(position[2]) and position[3] == 1.5
    assert ds.column("class_name").tolist() == ["a", "b"] * 3 and ds.column("patient")[5] == "p1"
    assert ds.geometry() == {"spacing_mm": 1.0, "modality": "CT"}
    assert ds.indices("val").tolist() == [1, 4] and len(ds) == 6
    assert ds.rows()[3] == {**ds.rows()[3], "row": 3, "split": "train", "label": 1, "seed": 17}
    with pytest.raises(KeyError, match="no column 'age'"):
        ds.column("age")


def test_a_damaged_table_is_named(tmp_path):
    write_dataset(tmp_path / "ds", np.zeros((3, 1, 8, 8), np.float16), _rows(3), ["a", "b"])
    csv_path = tmp_path / "ds" / "slices.csv"
    lines = csv_path.read_text().splitlines()
    csv_path.write_text("\n".join([*lines[:2], lines[2] + ",extra", lines[3]]) + "\n")
    with pytest.raises(ValueError, match=r"slices.csv: row 1 has 12 cells, the header 11"):
        SliceDataset.open(tmp_path / "ds")
    csv_path.write_text("\n".join(lines[:3]) + "\n")
    with pytest.raises(ValueError, match="slices.npy has 3 slices but slices.csv has 2 rows"):
        SliceDataset.open(tmp_path / "ds")


def test_the_writer_writes_into_a_folder_the_caller_made_atomic(tmp_path):
    out = tmp_path / "export.partial"
    out.mkdir()
    (out / "images.txt").write_text("the caller's own files stay")
    info = write_dataset(out, np.zeros((4, 1, 8, 8), np.float16), _rows(4), ["a", "b"], atomic=False)
    assert sorted(p.name for p in out.iterdir()) == [
        "dataset.json",
        "images.txt",
        "report.csv",
        "slices.csv",
        "slices.npy",
    ]
    assert not list(tmp_path.glob("*.partial.partial")) and SliceDataset.open(out).content_hash == info["content_hash"]
    assert (
        info["content_hash"]
        == write_dataset(tmp_path / "atomic", np.zeros((4, 1, 8, 8)), _rows(4), ["a", "b"])["content_hash"]
    )


def test_reading_a_dataset_imports_neither_pydicom_nor_nibabel(tmp_path):
    write_dataset(tmp_path / "ds", np.zeros((2, 1, 8, 8), np.float16), _rows(2), ["a", "b"])
    code = (
        "import sys; from medgan.dataset import SliceDataset; SliceDataset.open(sys.argv[1]).images.sum(); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pydicom', 'nibabel') or m == 'medgan.ingest'))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ds")], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
