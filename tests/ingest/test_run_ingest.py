"""run_ingest end to end: manifest validation, report, splits, the same hash twice, resume, folder mode with duplicate
grouping, and no identifier from the DICOM headers in any output byte."""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import medgan.ingest.worker as worker
from medgan.config import load_config
from medgan.dataset import SliceDataset
from medgan.ingest import run_ingest
from tests.conftest import require

TS = "nifti/totalsegmentator_ct_mr_with_labels"
ORGANS = "ingest.mask_labels={'5': liver, '1': spleen, '2': kidney, '3': kidney}"


def _cfg(*sets: str):
    return load_config(sets=["ingest.workers=1", *sets])


def _write_manifest(path: Path, rows: list[dict[str, str]]) -> Path:
    cols = ["source", "label", "patient", "modality", "split", "mask"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in cols})
    return path


@pytest.fixture()
def nifti_root(shared_data, tmp_path) -> Path:
    root = tmp_path / "root"
    (root / "ts").mkdir(parents=True)
    for name in ("example_ct_sm.nii.gz", "example_seg.nii.gz", "example_mr_sm.nii.gz", "example_seg_mr.nii.gz"):
        shutil.copy(require(shared_data / TS / name), root / "ts" / name)
    (root / "empty").mkdir()
    shutil.copy(root / "ts" / "example_ct_sm.nii.gz", root / "ts" / "ct_copy.nii.gz")
    (root / "ts" / "cut.nii.gz").write_bytes((root / "ts" / "example_mr_sm.nii.gz").read_bytes()[:4000])
    (tmp_path / "outside.nii.gz").write_bytes((root / "ts" / "example_mr_sm.nii.gz").read_bytes())
    _write_manifest(
        root / "manifest.csv",
        [
            {"source": "ts/example_ct_sm.nii.gz", "modality": "CT", "mask": "ts/example_seg.nii.gz"},
            {"source": "ts/example_mr_sm.nii.gz", "label": "mr", "modality": "MR", "patient": "PAT-0042"},
            {"source": "../outside.nii.gz", "label": "mr"},
            {"source": "ts/missing.nii.gz", "label": "mr"},
            {"source": "ts/example_mr_sm.nii.gz", "label": "mr", "split": "holdout"},
            {"source": "empty", "label": "mr"},
            {"source": "ts/ct_copy.nii.gz", "modality": "CT", "mask": "ts/example_seg_mr.nii.gz"},
            {"source": "ts/cut.nii.gz", "label": "mr"},
            {"source": "ts/example_ct_sm.nii.gz", "modality": "CT", "mask": "ts/example_seg.nii.gz"},
        ],
    )
    return root


def _report(out: Path) -> dict[int, dict[str, str]]:
    with open(out / "report.csv", newline="") as f:
        return {int(r["manifest_row"]): r for r in csv.DictReader(f)}


def test_manifest_ingest_reports_bad_rows_and_lands_the_rest(nifti_root, tmp_path):
    out, key = tmp_path / "ds", tmp_path / "secret" / "k.key"
    rep = run_ingest(_cfg(ORGANS), out, manifest=nifti_root / "manifest.csv", key_file=key, progress=False)
    assert rep.n_ok == 2 and rep.n_skipped == 7 and rep.dataset_path == out
    report = _report(out)
    assert report[1]["status"] == "ok" and int(report[1]["n_slices"]) > 0
    assert "escapes --root" in report[3]["reason"] and report[3]["source"] == "<outside root>"
    assert "not found" in report[4]["reason"]
    assert "unknown split 'holdout'" in report[5]["reason"]
    assert "empty folder" in report[6]["reason"]
    assert "wrong-shaped mask" in report[7]["reason"]
    assert report[8]["status"] == "skipped" and "cut.nii.gz" in report[8]["reason"]
    assert report[9]["reason"] == "duplicate of row 1 (the same source): not ingested twice"
    assert "escapes --root" in rep.summary() and str(out) in rep.summary()

    ds = SliceDataset.open(out)
    assert ds.classes == sorted(ds.classes) and {"liver", "mr"} <= set(ds.classes) <= {
        "kidney",
        "liver",
        "mr",
        "spleen",
    }
    assert ds.images.shape[1:] == (1, 128, 128) and len(ds) == rep.n_slices
    rows = ds.rows()
    assert {r["patient"] for r in rows if r["class_name"] == "mr"} == {rows[-1]["patient"]}
    assert all(r["patient"].startswith("p-") and r["volume"].startswith("p-") for r in rows)
    for p in {r["patient"] for r in rows}:  # patient-level split
        assert len({r["split"] for r in rows if r["patient"] == p}) == 1
    meta = ds.meta
    assert meta["source_manifest_sha256"] == hashlib.sha256((nifti_root / "manifest.csv").read_bytes()).hexdigest()
    assert meta["ingest_config"]["mask_labels"]["5"] == "liver"
    assert "CT window abdomen W400/L40 HU" in meta["normalization"]["used"]
    everything = b"".join(p.read_bytes() for p in out.iterdir())
    assert str(nifti_root).encode() not in everything and b"PAT-0042" not in everything
    assert not (tmp_path / "ds.parts").exists() and key.is_file()


def test_same_inputs_same_hash(nifti_root, tmp_path):
    key = tmp_path / "k.key"
    a = run_ingest(_cfg(ORGANS), tmp_path / "a", manifest=nifti_root / "manifest.csv", key_file=key, progress=False)
    b = run_ingest(_cfg(ORGANS), tmp_path / "b", manifest=nifti_root / "manifest.csv", key_file=key, progress=False)
    assert a.content_hash == b.content_hash == SliceDataset.open(tmp_path / "b").content_hash
    bone = _cfg(ORGANS, "ingest.ct_window=bone")
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        run_ingest(bone, tmp_path / "a", manifest=nifti_root / "manifest.csv", key_file=key, progress=False)
    c = run_ingest(
        bone, tmp_path / "a", manifest=nifti_root / "manifest.csv", key_file=key, overwrite=True, progress=False
    )
    assert c.content_hash != a.content_hash == b.content_hash  # and the rerun replaced "a" in place
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("not a dataset")
    with pytest.raises(ValueError, match="not a medgan dataset"):
        run_ingest(bone, tmp_path / "notes", manifest=nifti_root / "manifest.csv", key_file=key, overwrite=True)
    assert (tmp_path / "notes" / "mine.txt").read_text() == "not a dataset"


class _Interrupting:
    """Counts NIfTI reads in the workers (run in-process) and, while `interrupt` is set, raises KeyboardInterrupt at
    the second read: the user pressed Ctrl-C while the 2nd volume was being read."""

    def __init__(self, monkeypatch):
        self.reads: list[str] = []
        self.interrupt = True
        real = worker.read_nifti

        def counting(path, **kw):
            self.reads.append(Path(path).name)
            if len(self.reads) == 2 and self.interrupt:
                raise KeyboardInterrupt
            return real(path, **kw)

        monkeypatch.setattr(worker, "read_nifti", counting)

    def arm(self, interrupt: bool) -> None:
        """Forget the reads so far; interrupt the next run's second read or not."""
        self.interrupt, self.reads[:] = interrupt, []


def _two_volumes(nifti_root: Path, name: str) -> Path:
    return _write_manifest(
        nifti_root / name,
        [
            {"source": "ts/example_mr_sm.nii.gz", "label": "mr", "modality": "MR"},
            {"source": "ts/example_ct_sm.nii.gz", "label": "ct", "modality": "CT"},
        ],
    )


def test_resume_after_interruption_does_not_redo_finished_sources(nifti_root, tmp_path, monkeypatch):
    manifest = _two_volumes(nifti_root, "two.csv")
    state = _Interrupting(monkeypatch)
    out, key = tmp_path / "ds", tmp_path / "k.key"
    with pytest.raises(KeyboardInterrupt):
        run_ingest(_cfg(), out, manifest=manifest, key_file=key, progress=False)
    assert len(list((tmp_path / "ds.parts").glob("*.json"))) == 1 and not out.exists()
    state.arm(False)
    rep = run_ingest(_cfg(), out, manifest=manifest, key_file=key, progress=False)
    assert state.reads == ["example_ct_sm.nii.gz"] and rep.n_reused == 1  # the finished MR volume was not read again
    clean = run_ingest(_cfg(), tmp_path / "clean", manifest=manifest, key_file=key, progress=False)
    assert rep.content_hash == clean.content_hash
    assert not (tmp_path / "ds.parts").exists()  # parts are removed once the dataset is complete
    # Interrupt again, then touch the finished file: its part is stale and is redone.
    state.arm(True)
    with pytest.raises(KeyboardInterrupt):
        run_ingest(_cfg(), tmp_path / "again", manifest=manifest, key_file=key, progress=False)
    os.utime(nifti_root / "ts/example_mr_sm.nii.gz", ns=(1_000_000_000, 1_000_000_000))
    state.arm(False)
    rep = run_ingest(_cfg(), tmp_path / "again", manifest=manifest, key_file=key, progress=False)
    assert state.reads == ["example_mr_sm.nii.gz", "example_ct_sm.nii.gz"] and rep.n_reused == 0


def test_folder_of_classes_keeps_duplicates_in_one_split(shared_data, tmp_path):
    brain = require(shared_data / "labelled_2d/brain_tumor_mri/Training")
    folder = tmp_path / "classes"
    for cls in ("notumor", "pituitary"):
        (folder / cls).mkdir(parents=True)
        for f in sorted((brain / cls).glob("*.jpg"))[:12]:
            shutil.copy(f, folder / cls / f.name)
    src = sorted((brain / "notumor").glob("*.jpg"))[0]
    for i in range(3):  # exact copies and a brightened copy of one image
        shutil.copy(src, folder / "notumor" / f"zz_copy{i}.jpg")
    img = np.asarray(Image.open(src).convert("L"), dtype=np.float32)
    Image.fromarray(np.clip(img * 0.8 + 20, 0, 255).astype(np.uint8)).save(folder / "notumor" / "zz_bright.png")
    (folder / "pituitary" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (folder / "emptyclass").mkdir()
    cfg = _cfg("ingest.workers=2", "ingest.images_per_part=8", "ingest.split_fractions=[0.4,0.3,0.3]")
    rep = run_ingest(cfg, tmp_path / "ds", folder=folder, key_file=tmp_path / "k.key", progress=False)
    ds = SliceDataset.open(tmp_path / "ds")
    assert ds.classes == ["notumor", "pituitary"] and len(ds) == 28
    report = {r["source"]: r for r in rep.report}
    assert (
        report["pituitary/broken.jpg"]["status"] == "skipped"
        and "broken.jpg" in report["pituitary/broken.jpg"]["reason"]
    )
    assert report["emptyclass"]["reason"] == "empty class folder"
    by_source = {r["source"]: r for r in rep.report}
    assert set(by_source) >= {f"notumor/zz_copy{i}.jpg" for i in range(3)}
    # Rows follow report order (ok rows only), so map slices back to their files.
    ok_sources = [r["source"] for r in rep.report if r["status"] == "ok"]
    patient = dict(zip(ok_sources, ds.column("patient"), strict=True))
    split = dict(zip(ok_sources, ds.column("split"), strict=True))
    dup_names = ["notumor/" + src.name, *[f"notumor/zz_copy{i}.jpg" for i in range(3)], "notumor/zz_bright.png"]
    assert len({patient[n] for n in dup_names}) == 1 and len({split[n] for n in dup_names}) == 1
    splits_per_patient = defaultdict(set)
    for r in ds.rows():
        splits_per_patient[r["patient"]].add(r["split"])
    assert all(len(s) == 1 for s in splits_per_patient.values())
    assert len(set(ds.column("split"))) >= 2


def test_decubitus_dicom_leaves_no_identifier_in_any_output(shared_data, tmp_path):
    pydicom = pytest.importorskip("pydicom")
    base = require(shared_data / "dicom/mr_decubitus_t1_4positions")
    if not (Path(worker.__file__).parent / "dicom.py").exists():
        pytest.skip("medgan.ingest.dicom not available yet")
    positions = sorted(p.name for p in base.iterdir() if p.is_dir())
    manifest = _write_manifest(tmp_path / "m.csv", [{"source": p, "label": "brain"} for p in positions])
    rep = run_ingest(_cfg(), tmp_path / "ds", manifest=manifest, root=base, key_file=tmp_path / "k.key", progress=False)
    assert rep.n_ok == 4, rep.summary()
    first = sorted((base / positions[0]).glob("*.dcm"))[0]
    hdr = pydicom.dcmread(first, stop_before_pixels=True)
    secrets = {b"stc_test", b"STC_TEST", b"crlab", str(hdr.PatientName).encode(), str(hdr.PatientID).encode()}
    for kw in ("PatientBirthDate", "AccessionNumber", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        if str(hdr.get(kw, "")).strip():
            secrets.add(str(hdr.get(kw)).encode())
    secrets.discard(b"")
    # This volunteer's PatientName is "HFS", which is also in the folder names the manifest chose; paths may appear.
    secrets = {x for x in secrets if not any(x.decode().lower() in p.lower() for p in positions)}
    assert b"crlab" in secrets and len(secrets) >= 5
    blobs = [p.read_bytes() for p in (tmp_path / "ds").iterdir()] + [rep.summary().encode()]
    for s in secrets:
        assert not any(s.lower() in b.lower() for b in blobs), f"identifier {s!r} leaked"
    ds = SliceDataset.open(tmp_path / "ds")
    assert len(set(ds.column("patient"))) == 1  # one volunteer, one pseudonymous patient, one split
    assert len(set(ds.column("volume"))) == 4


def test_dicom_tag_mapping_labels_series(shared_data, tmp_path):
    if not (Path(worker.__file__).parent / "dicom.py").exists():
        pytest.skip("medgan.ingest.dicom not available yet")
    kits = require(shared_data / "dicom/ct_tcia_kits00072_18slices")
    j2k = require(shared_data / "dicom/ct_totalsegmentator_j2k_20slices/series")
    manifest = _write_manifest(tmp_path / "m.csv", [{"source": "kits"}, {"source": "j2k"}])
    shutil.copytree(kits, tmp_path / "kits")  # copies: a symlink leading out of the root is refused
    shutil.copytree(j2k, tmp_path / "j2k")
    cfg = _cfg("ingest.dicom_label_tag=SeriesDescription", "ingest.dicom_label_map={arterial: arterial_ct}")
    rep = run_ingest(cfg, tmp_path / "ds", manifest=manifest, key_file=tmp_path / "k.key", progress=False)
    ds = SliceDataset.open(tmp_path / "ds")
    assert ds.classes == ["arterial_ct"] and rep.report[0]["status"] == "ok"
    # The other series' description is not in the map: skipped with the rule named.
    assert rep.report[1]["status"] == "skipped" and "dicom_label_map" in rep.report[1]["reason"]
    assert set(ds.column("modality").tolist()) == {"CT"}


def test_folder_of_odd_dicom_objects_lands_every_readable_image(shared_data, tmp_path):
    # Radiographs (MONOCHROME1, J2K), LUT-scaled and multi-frame objects, a truncated file and a bad sequence, all in
    # one folder source: each image is its own series; the unreadable ones are noted and the rest lands.
    root = require(shared_data / "dicom" / "odd")
    manifest = _write_manifest(tmp_path / "m.csv", [{"source": "pydicom_data_selection", "label": "odd"}])
    report = run_ingest(_cfg(), tmp_path / "odd", manifest=manifest, root=root, key_file=tmp_path / "k")
    row = _report(tmp_path / "odd")[1]
    assert row["status"] == "ok", row
    volumes = set(SliceDataset.open(tmp_path / "odd").column("volume"))
    assert report.n_slices >= 40 and len(volumes) >= 8
    assert "not used" in row["reason"]  # the truncated file is reported, not silently dropped


def test_a_damaged_part_is_redone_on_resume(nifti_root, tmp_path, monkeypatch):
    """A part whose images no longer match its digests (zeroed by a crash before the disk caught up) is read again."""
    manifest = _two_volumes(nifti_root, "two_damaged.csv")
    state = _Interrupting(monkeypatch)
    out, key = tmp_path / "ds", tmp_path / "k.key"
    with pytest.raises(KeyboardInterrupt):
        run_ingest(_cfg(), out, manifest=manifest, key_file=key, progress=False)
    (part,) = (tmp_path / "ds.parts").glob("*.npy")
    images = np.load(part)
    np.save(part, np.zeros_like(images))  # right size and a valid range, wrong content
    state.arm(False)
    rep = run_ingest(_cfg(), out, manifest=manifest, key_file=key, progress=False)
    assert state.reads == ["example_mr_sm.nii.gz", "example_ct_sm.nii.gz"] and rep.n_reused == 0
    clean = run_ingest(_cfg(), tmp_path / "clean", manifest=manifest, key_file=key, progress=False)
    assert rep.content_hash == clean.content_hash
    np.testing.assert_array_equal(SliceDataset.open(out).images, SliceDataset.open(tmp_path / "clean").images)


def test_the_pool_gets_the_largest_sources_first(nifti_root, tmp_path):
    """Work items carry their sources' bytes; the pool starts the biggest first, ties in manifest order."""
    from medgan.ingest import _tasks, largest_first
    from medgan.ingest.manifest import read_manifest
    from medgan.ingest.worker import Task, part_id

    names = ("example_mr_sm.nii.gz", "example_ct_sm.nii.gz", "mr_copy.nii.gz", "ct_copy.nii.gz")
    shutil.copy(nifti_root / "ts" / names[0], nifti_root / "ts" / names[2])
    rows = [{"source": f"ts/{n}", "label": "x", "modality": "CT"} for n in names]
    manifest = _write_manifest(nifti_root / "sizes.csv", rows)
    cfg = _cfg().ingest
    sources, _, _ = read_manifest(manifest, nifti_root, cfg)
    tasks = []
    for group in _tasks(sources, cfg.images_per_part):
        pid, size = part_id(group, cfg, "k")
        assert size == sum(s.path.stat().st_size for s in group)
        tasks.append(Task(group, cfg, b"k" * 32, nifti_root, tmp_path, pid, size))
    order = [t.sources[0].row for t in largest_first(tasks)]
    big, small = (2, 1) if tasks[1].size > tasks[0].size else (1, 2)
    assert order == [big, big + 2, small, small + 2]


def test_the_cli_refuses_an_existing_out_unless_overwrite(nifti_root, tmp_path):
    from click.testing import CliRunner

    from medgan.cli import main

    manifest = _two_volumes(nifti_root, "cli.csv")
    args = ["ingest", "--manifest", str(manifest), "--out", str(tmp_path / "ds"), "--workers", "1"]
    args += ["--key-file", str(tmp_path / "key" / "k")]
    runner = CliRunner()
    assert runner.invoke(main, args).exit_code == 0
    refused = runner.invoke(main, args)
    assert refused.exit_code == 1 and "already exists; pass --overwrite" in refused.output
    assert runner.invoke(main, [*args, "--overwrite"]).exit_code == 0
    (tmp_path / "mine").mkdir()
    other = runner.invoke(main, [*args[:4], str(tmp_path / "mine"), *args[5:], "--overwrite"])
    assert other.exit_code == 1 and "is not a medgan dataset" in other.output and (tmp_path / "mine").is_dir()


def _crash_on_ct(task):
    """A worker that dies on the CT volume (as a decoder segfault would) and reads the others."""
    if any("ct" in s.rel for s in task.sources):
        os._exit(1)
    return worker.run_task(task)


def test_a_source_that_kills_its_worker_fails_alone_and_the_rest_lands(nifti_root, tmp_path, monkeypatch):
    import medgan.ingest.pool as pool

    manifest = _write_manifest(
        nifti_root / "crash.csv",
        [{"source": "ts/example_mr_sm.nii.gz", "label": "mr", "modality": "MR"},
         {"source": "ts/example_ct_sm.nii.gz", "label": "ct", "modality": "CT"},
         {"source": "ts/example_seg_mr.nii.gz", "label": "mr", "modality": "MR"}],
    )  # fmt: skip
    monkeypatch.setattr(pool, "run_task", _crash_on_ct)  # the forked workers inherit it
    rep = run_ingest(_cfg("ingest.workers=2"), tmp_path / "ds", manifest=manifest, key_file=tmp_path / "k")
    assert [r["status"] for r in rep.report] == ["ok", "skipped", "ok"]
    assert rep.report[1]["reason"].startswith("worker failed: the worker reading it died")


def test_a_row_naming_a_folder_of_series_folders_is_read_per_folder(shared_data, tmp_path):
    """One manifest row for the four decubitus positions (a folder of series folders) is read as one work item per
    sub-folder: the same slices as four rows, and one report line for the row."""
    base = require(shared_data / "dicom/mr_decubitus_t1_4positions")
    positions = sorted(p.name for p in base.iterdir() if p.is_dir())
    one = _write_manifest(tmp_path / "one.csv", [{"source": base.name, "label": "brain"}])
    four = _write_manifest(tmp_path / "four.csv", [{"source": f"{base.name}/{p}", "label": "brain"} for p in positions])
    key = tmp_path / "k.key"
    rep = run_ingest(_cfg(), tmp_path / "one", manifest=one, root=base.parent, key_file=key, progress=False)
    ref = run_ingest(_cfg(), tmp_path / "four", manifest=four, root=base.parent, key_file=key, progress=False)
    assert rep.n_items == 4 and len(rep.report) == 1 and rep.n_ok == 1, rep.summary()
    line = rep.report[0]
    assert (line["manifest_row"], line["source"], line["status"]) == (1, base.name, "ok")
    assert line["n_slices"] == sum(r["n_slices"] for r in ref.report) == len(SliceDataset.open(tmp_path / "four"))
    assert line["reason"].startswith("read as 4 sub-folders, 4 with slices")
    assert not any(p in line["reason"] for p in positions)  # sub-folders are named by number only
    a, b = SliceDataset.open(tmp_path / "one"), SliceDataset.open(tmp_path / "four")
    np.testing.assert_array_equal(a.images, b.images)
    for col in ("volume", "patient", "split", "slice_index"):
        assert list(a.column(col)) == list(b.column(col)), col
    assert len(set(a.column("volume"))) == 4


def test_a_series_split_over_two_sibling_folders_is_read_as_two_pieces_and_says_so(tmp_path):
    """A series whose files lie in two sub-folders of one row: each folder's files become their own volume (distinct
    volume ids) and the row's line says the series continues in another sub-folder; a sub-folder with nothing DICOM
    discovery reads is left out; ingest.split_folder_rows=false reads the row whole."""
    from tests.ingest.test_dicom import AXIAL, write_series

    staging, _ = write_series(tmp_path / "staging", AXIAL)
    files = sorted(staging.iterdir())
    assert len(files) == 4
    root = tmp_path / "root"
    for i, f in enumerate(files):
        sub = root / "archive" / "Doe_Jane" / ("a" if i < 2 else "b")  # a chain of one folder is followed down
        sub.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, sub / f.name)
    (root / "archive" / "Doe_Jane" / "notes").mkdir()
    (root / "archive" / "Doe_Jane" / "notes" / "readme.txt").write_text("not DICOM")
    manifest = _write_manifest(tmp_path / "m.csv", [{"source": "archive", "label": "ct"}])
    cfg = _cfg("ingest.min_series_slices=2", "ingest.min_foreground_fraction=0")
    rep = run_ingest(cfg, tmp_path / "ds", manifest=manifest, root=root, key_file=tmp_path / "k", progress=False)
    assert rep.n_items == 2 and [(r["manifest_row"], r["source"], r["status"]) for r in rep.report] == [
        (1, "archive", "ok")
    ], rep.summary()
    assert "read as 2 sub-folders, 2 with slices" in rep.report[0]["reason"]
    assert "sub-folders 1-2: a series continues in another sub-folder" in rep.report[0]["reason"]
    assert "Doe" not in rep.summary() and "Jane" not in rep.summary()
    ds = SliceDataset.open(tmp_path / "ds")
    assert len(ds) == 4 and len(set(ds.column("volume"))) == 2 and len(set(ds.column("patient"))) == 1
    # Read whole on request: one series, one volume, one report line.
    cfg = _cfg("ingest.min_series_slices=2", "ingest.min_foreground_fraction=0", "ingest.split_folder_rows=false")
    whole = run_ingest(cfg, tmp_path / "whole", manifest=manifest, root=root, key_file=tmp_path / "k", progress=False)
    assert whole.n_items == 1 and [(r["source"], r["status"], r["reason"]) for r in whole.report] == [
        ("archive", "ok", "")
    ], whole.summary()
    ds = SliceDataset.open(tmp_path / "whole")
    assert len(ds) == 4 and len(set(ds.column("volume"))) == 1
