"""Hostile and odd input, each from a tiny file built here: a one-line reason, bounded memory, and the rest lands.

Memory bombs (a NIfTI voxel offset of 2e9, a gzip bomb, an RLE DICOM claiming 32768x32768), symlink loops, dangling
symlinks, FIFOs and /dev/zero, escapes from --root through a symlink, manifest quirks, wrong reasons, and workers
whose parent was killed.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, RLELossless, generate_uid

from medgan.config import load_config
from medgan.ingest import run_ingest
from tests.ingest.test_dicom import AXIAL, write_series

ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail instead of hanging (a FIFO read blocks forever)."""

    def fail(*_):
        raise TimeoutError(f"still running after {seconds} s: something blocked")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _cfg(*sets: str):
    return load_config(sets=["ingest.workers=1", "ingest.min_foreground_fraction=0", *sets])


def _ingest(tmp: Path, root: Path, rows: list[str], *sets: str, label: str = "x"):
    manifest = tmp / "m.csv"
    manifest.write_text("source,label\n" + "".join(f"{r},{label}\n" for r in rows))
    with deadline(60):
        return run_ingest(
            _cfg(*sets), tmp / "ds", manifest=manifest, root=root, key_file=tmp / "key" / "k", progress=False
        )


# Crafted files.


def vox_offset_bomb(path: Path) -> Path:
    """A ~140-byte .nii.gz whose header puts the voxels 2e9 bytes in."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((4, 4, 4))
    hdr.set_data_dtype(np.int16)
    hdr["vox_offset"] = 2e9
    path.write_bytes(gzip.compress(hdr.binaryblock + b"\0" * 4 + bytes(128)))
    return path


def gzip_bomb(path: Path, shape=(1024, 1024, 512), payload_mb: int = 20) -> Path:
    """A .nii.gz of ~20 KB that inflates to 20 MB of zeros and whose header claims a 512 MB volume."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.uint8)
    hdr.set_qform(np.eye(4), 1)
    hdr["vox_offset"] = 352
    path.write_bytes(gzip.compress(hdr.binaryblock + b"\0" * 4 + bytes(payload_mb << 20), compresslevel=9))
    return path


def extension_bomb(path: Path, esize: int = 7, payload_mb: int = 256) -> Path:
    """A ~250 KB .nii.gz declaring a 4x4x4 volume whose one header extension claims `esize` bytes (7: nibabel would
    read the rest of the stream, 256 MB of zeros)."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((4, 4, 4))
    hdr.set_data_dtype(np.int16)
    hdr.set_qform(np.eye(4), 1)
    hdr["vox_offset"] = 352 + 16
    ext = np.array([esize, 6], "<i4").tobytes() + bytes(8)
    with gzip.open(path, "wb") as f:  # written in 1 MB pieces: this process never holds the payload
        f.write(hdr.binaryblock + b"\1\0\0\0" + ext + bytes(128))
        for _ in range(payload_mb):
            f.write(bytes(1 << 20))
    return path


def rle_bomb(path: Path, side: int = 32768) -> Path:
    """A ~1 KB RLE Lossless CT image claiming side x side pixels."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
    meta.TransferSyntaxUID = RLELossless
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.SeriesInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID, "1.2.3"
    ds.Modality, ds.Rows, ds.Columns, ds.SamplesPerPixel = "CT", side, side, 1
    ds.PhotometricInterpretation, ds.BitsAllocated, ds.BitsStored, ds.HighBit = "MONOCHROME2", 8, 8, 7
    ds.PixelRepresentation = 0
    # One RLE segment of replicate runs: 64 header bytes then (-127, 0) pairs, each expanding to 128 zero bytes.
    segment = np.array([1] + [64] + [0] * 14, "<u4").tobytes() + b"\x81\x00" * 400
    ds.PixelData = pydicom.encaps.encapsulate([segment])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def small_nifti(path: Path) -> Path:
    data = np.random.default_rng(0).integers(0, 1000, (16, 16, 6)).astype(np.int16)
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    return path


# Memory bombs.


def test_memory_bombs_are_skipped_unread_with_the_limit_named(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    vox_offset_bomb(root / "offset.nii.gz")
    gzip_bomb(root / "bomb.nii.gz")
    extension_bomb(root / "ext7.nii.gz")
    extension_bomb(root / "ext2g.nii.gz", esize=2**31 - 1, payload_mb=1)
    rle_bomb(root / "rle32768.dcm")
    rle_bomb(root / "rle65535.dcm", 65535)
    small_nifti(root / "fine.nii.gz")
    assert (root / "offset.nii.gz").stat().st_size < 200 and (root / "rle32768.dcm").stat().st_size < 2000
    sources = ["offset.nii.gz", "bomb.nii.gz", "ext7.nii.gz", "ext2g.nii.gz", "rle32768.dcm", "rle65535.dcm"]
    rep = _ingest(tmp_path, root, [*sources, "fine.nii.gz"])
    reasons = {r["source"]: r["reason"] for r in rep.report}
    assert "voxel offset 2000000000 is implausible" in reasons["offset.nii.gz"]
    assert "a header extension at byte 352 declares 7 bytes, past the voxel offset 368" in reasons["ext7.nii.gz"]
    assert "declares 2147483647 bytes, past the voxel offset" in reasons["ext2g.nii.gz"]
    assert "more than its" in reasons["bomb.nii.gz"] and "gzip bytes can hold" in reasons["bomb.nii.gz"]
    assert "declares 1x32768x32768 pixels (1024 MB) from a" in reasons["rle32768.dcm"]
    assert "65535x65535 pixels" in reasons["rle65535.dcm"] and "ingest.max_volume_mb" in reasons["rle65535.dcm"]
    assert rep.report[-1]["status"] == "ok" and rep.n_ok == 1
    # A header within what its file can hold but over the configured limit names the limit.
    small = run_ingest(_cfg("ingest.max_volume_mb=0.001"), tmp_path / "small", manifest=tmp_path / "m.csv",
                       root=root, key_file=tmp_path / "key" / "k", progress=False)  # fmt: skip
    assert "over ingest.max_volume_mb (0.001 MB" in small.report[-1]["reason"]


def test_memory_stays_bounded_on_the_bombs(tmp_path):
    """In a fresh process: reading every bomb peaks far below what the headers claim (1-8 GB)."""
    root = tmp_path / "root"
    root.mkdir()
    vox_offset_bomb(root / "offset.nii.gz")
    gzip_bomb(root / "bomb.nii.gz")
    extension_bomb(root / "ext.nii.gz")
    rle_bomb(root / "rle.dcm", 65535)
    script = textwrap.dedent(f"""
        import resource, sys
        from pathlib import Path
        from medgan.config import load_config
        from medgan.ingest import run_ingest
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        root = Path({str(root)!r})
        m = root.parent / "m.csv"
        m.write_text("source,label\\noffset.nii.gz,x\\nbomb.nii.gz,x\\next.nii.gz,x\\nrle.dcm,x\\n")
        rep = run_ingest(load_config(sets=["ingest.workers=1"]), root.parent / "ds", manifest=m, root=root,
                         key_file=root.parent / "key" / "k", progress=False)
        assert rep.n_skipped == 4, rep.summary()
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) < 200  # MB above the imports; the headers claim 256 MB to 8 GB


# Bad entries inside a DICOM folder, hangs and escapes.


def test_bad_entries_in_a_dicom_folder_are_skipped_and_the_series_lands(tmp_path):
    root = tmp_path / "root"
    folder, _ = write_series(root / "series", AXIAL)
    (folder / "loop").symlink_to(folder / "loop")
    (folder / "dangling").symlink_to(tmp_path / "nothing_here")
    os.mkfifo(folder / "pipe")
    (folder / "zero").symlink_to("/dev/zero")
    (folder / "sub").mkdir()
    (folder / "sub" / "up").symlink_to(folder, target_is_directory=True)  # a folder loop: not followed
    os.mkfifo(root / "pipe.nii.gz")
    (root / "zero.nii.gz").symlink_to("/dev/zero")
    rep = _ingest(tmp_path, root, ["series", "pipe.nii.gz", "zero.nii.gz"])
    row, pipe, zero = rep.report
    assert row["status"] == "ok" and row["n_slices"] == 4, rep.summary()
    assert "5 file(s) not used" in row["reason"] and "symlink loop" in row["reason"]
    assert "not a regular file" in row["reason"] or "dangling symlink" in row["reason"]
    assert pipe["reason"] == "source is not a regular file or folder (FIFO, socket or device): not read"
    assert "escapes --root through a symlink" in zero["reason"]


def test_a_folder_entry_pointing_at_a_device_or_fifo_is_never_opened(tmp_path):
    from medgan.ingest.dicom import dicom_files

    folder = tmp_path / "d"
    folder.mkdir()
    os.mkfifo(folder / "pipe")
    (folder / "zero").symlink_to("/dev/zero")
    (folder / "loop").symlink_to(folder / "loop")
    (folder / "dangling").symlink_to(tmp_path / "missing")
    with deadline(10):
        files, skips = dicom_files(folder, tmp_path)
    assert files == []
    assert {s.path.name: s.reason for s in skips} == {
        "dangling": "dangling symlink (its target does not exist)",
        "loop": "symlink loop",
        "pipe": "not a regular file (FIFO, socket or device): not read",
        "zero": "not a regular file (FIFO, socket or device): not read",
    }


def test_no_escape_from_root_through_a_symlink(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    small_nifti(tmp_path / "secret.nii.gz")
    small_nifti(outside / "secret.nii.gz")
    (root / "lnk").symlink_to(outside, target_is_directory=True)
    small_nifti(root / "fine.nii.gz")
    rep = _ingest(tmp_path, root, ["lnk/../secret.nii.gz", "lnk/secret.nii.gz", "fine.nii.gz"])
    assert [r["status"] for r in rep.report] == ["skipped", "skipped", "ok"]
    for r in rep.report[:2]:
        assert r["reason"] == "source path escapes --root through a symlink (its real path is outside the root folder)"


# The manifest.


def test_conflicting_splits_for_one_patient_are_refused_and_duplicate_rows_skipped(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    for name in ("a.nii.gz", "b.nii.gz", "c.nii.gz"):
        small_nifti(root / name)
    manifest = tmp_path / "m.csv"
    manifest.write_text("source,label,patient,split\na.nii.gz,x,P1,train\nb.nii.gz,x,P1,test\nc.nii.gz,x,P2,val\n")
    with pytest.raises(
        ValueError, match=r"1 patient\(s\) are given different splits \(row 1 says train, row 2 says test\)"
    ):
        run_ingest(_cfg(), tmp_path / "ds", manifest=manifest, root=root, key_file=tmp_path / "key" / "k")
    assert not (tmp_path / "ds").exists()
    manifest.write_text("source,label,patient,split\na.nii.gz,x,P1,train\nb.nii.gz,x,P1,\n./a.nii.gz,x,P1,train\n")
    rep = run_ingest(_cfg(), tmp_path / "ds", manifest=manifest, root=root, key_file=tmp_path / "key" / "k")
    assert rep.report[2]["reason"] == "duplicate of row 1 (the same source): not ingested twice"
    from medgan.dataset import SliceDataset

    ds = SliceDataset.open(tmp_path / "ds")
    assert set(ds.column("split")) == {"train"}  # one patient, one split: the manifest's


def test_the_manifest_follows_the_csv_rules(tmp_path):
    """A quoted newline stays in its field; U+2028 and U+0085 in a path are no row breaks."""
    root = tmp_path / "root"
    root.mkdir()
    names = ["two\nlines.nii.gz", "sep\u2028arator.nii.gz", "next\u0085line.nii.gz"]
    for n in names:
        small_nifti(root / n)
    manifest = tmp_path / "m.csv"
    manifest.write_text("source,label\n" + "".join(f'"{n}",x\n' for n in names), encoding="utf-8")
    rep = run_ingest(_cfg(), tmp_path / "ds", manifest=manifest, root=root, key_file=tmp_path / "key" / "k")
    assert [r["status"] for r in rep.report] == ["ok"] * 3 and [r["source"] for r in rep.report] == names


# Valid files that must land, and reasons that must say what is wrong.


def test_deflated_and_rgb_jpeg_files_land(tmp_path):
    from pydicom.data import get_testdata_file

    root = tmp_path / "root"
    root.mkdir()
    for name in ("image_dfl.dcm", "SC_rgb_jpeg.dcm"):
        (root / name).write_bytes(Path(get_testdata_file(name)).read_bytes())
    rep = _ingest(tmp_path, root, ["image_dfl.dcm", "SC_rgb_jpeg.dcm"])
    assert [r["status"] for r in rep.report] == ["ok", "ok"], rep.summary()


def test_reasons_say_what_is_wrong_with_the_file(tmp_path, monkeypatch):
    from pydicom.data import get_testdata_file

    root = tmp_path / "root"
    root.mkdir()
    for name in ("rtplan.dcm", "JPEG-lossy.dcm"):
        (root / name).write_bytes(Path(get_testdata_file(name)).read_bytes())
    (root / "tiny").mkdir()
    leaves = Path(pydicom.data.__file__).parent / "test_files/dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000"
    for name in ("IM000000", "IM000001"):  # CT Image Storage headers without Pixel Data (a DICOMDIR's leaves)
        (root / "tiny" / name).write_bytes((leaves / name).read_bytes())
    small_nifti(root / "fine.nii.gz")
    (root / "cut.dcm").write_bytes(Path(get_testdata_file("MR_small.dcm")).read_bytes()[:1000])  # ends mid-element
    rep = _ingest(tmp_path, root, ["rtplan.dcm", "JPEG-lossy.dcm", "tiny", "fine.nii.gz", "cut.dcm"])
    reasons = [r["reason"] for r in rep.report]
    assert "truncated: the file ends inside its header (MR Image Storage)" in reasons[4]
    assert "no pixel data (RT Plan Storage)" in reasons[0]
    assert "all available plugins: pylibjpeg" in reasons[1]  # the plugins' own words, not cut at the colon
    assert "2x no pixel data (CT Image Storage)" in reasons[2] and "not an image" not in reasons[2]
    # An allocation failure is called one, not a corrupt gzip.
    import nibabel.arrayproxy

    def no_memory(self, *a, **k):
        raise MemoryError

    monkeypatch.setattr(nibabel.arrayproxy.ArrayProxy, "get_unscaled", no_memory)
    again = tmp_path / "again"
    again.mkdir()
    rep = _ingest(again, root, ["fine.nii.gz"])
    assert "not enough memory" in rep.report[0]["reason"] and "gzip" not in rep.report[0]["reason"]


# Workers whose parent is killed.


def test_workers_exit_when_the_parent_is_killed(tmp_path):
    psutil = pytest.importorskip("psutil")
    root = tmp_path / "root"
    root.mkdir()
    for i in range(4):
        small_nifti(root / f"v{i}.nii.gz")
    (tmp_path / "m.csv").write_text("source,label\n" + "".join(f"v{i}.nii.gz,x\n" for i in range(4)))
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        import medgan.ingest as ingest
        import medgan.ingest.pool as pool
        import medgan.ingest.worker as worker
        from medgan.config import load_config

        def slow(task):  # a long read: the parent is killed meanwhile
            time.sleep(120)

        worker.run_task = pool.run_task = slow
        tmp = Path({str(tmp_path)!r})
        ingest.run_ingest(load_config(sets=["ingest.workers=2"]), tmp / "ds", manifest=tmp / "m.csv",
                          root=tmp / "root", key_file=tmp / "key" / "k", progress=False)
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    parent = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        t0 = time.time()
        workers: list = []
        while time.time() - t0 < 60 and len(workers) < 2:
            time.sleep(0.2)
            workers = psutil.Process(parent.pid).children()
        assert len(workers) == 2
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        gone, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive, f"{len(alive)} worker(s) still running after the parent was killed"
    finally:
        for p in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                p.kill()


def test_folder_mode_skips_fifos_and_links_out_of_the_folder(tmp_path):
    folder = tmp_path / "classes"
    (folder / "a").mkdir(parents=True)
    small_nifti(folder / "a" / "fine.nii.gz")
    small_nifti(tmp_path / "outside.nii.gz")
    os.mkfifo(folder / "a" / "pipe.nii.gz")
    (folder / "a" / "out.nii.gz").symlink_to(tmp_path / "outside.nii.gz")
    (folder / "a" / "zero.png").symlink_to("/dev/zero")
    with deadline(60):
        rep = run_ingest(_cfg(), tmp_path / "ds", folder=folder, key_file=tmp_path / "key" / "k", progress=False)
    reasons = {r["source"]: r["reason"] for r in rep.report}
    assert rep.report[0]["status"] == "ok" and rep.n_ok == 1
    assert reasons["a/pipe.nii.gz"] == "not a regular file (FIFO, socket or device): not read"
    assert reasons["a/out.nii.gz"] == "symlink leads outside --root: not read"
    assert reasons["a/zero.png"] == "not a regular file (FIFO, socket or device): not read"
