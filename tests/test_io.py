"""Atomic files and folders: readers never see half a file, failed builds keep the old folder, usual permissions."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from medgan.io import atomic_dir, atomic_write_json, atomic_write_text, read_json, sha256_array


def test_atomic_write_replaces_and_keeps_usual_permissions(tmp_path):
    p = atomic_write_text(tmp_path / "a" / "x.txt", "one")
    atomic_write_text(p, "two")
    assert p.read_text() == "two" and [q.name for q in p.parent.iterdir()] == ["x.txt"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600


def test_atomic_dir_keeps_old_folder_when_the_build_fails(tmp_path):
    final = tmp_path / "ds"
    with atomic_dir(final) as tmp:
        (tmp / "v").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "v").write_text("2")
        raise RuntimeError("interrupted")
    assert (final / "v").read_text() == "1"
    assert (tmp_path / "ds.partial" / "v").read_text() == "2"  # left for a resume
    with atomic_dir(final) as tmp:
        (tmp / "v").write_text("3")
    assert (final / "v").read_text() == "3" and not (tmp_path / "ds.partial").exists()


def test_json_round_trip_and_clear_error(tmp_path):
    p = atomic_write_json(tmp_path / "m.json", {"b": np.float32(1.5), "a": [np.int64(2)]})
    assert read_json(p) == {"a": [2], "b": 1.5}
    p.write_text("{")
    with pytest.raises(ValueError, match="m.json: not valid JSON"):
        read_json(p)


def test_array_hash_sees_dtype_shape_and_values():
    a = np.zeros((3, 2), np.float16)
    h = sha256_array(a).hexdigest()
    assert h == sha256_array(a.copy()).hexdigest()
    assert h != sha256_array(a.astype(np.float32)).hexdigest()
    assert h != sha256_array(a.reshape(2, 3)).hexdigest()
    b = a.copy()
    b[2, 1] = 1
    assert h != sha256_array(b).hexdigest()
