"""No identifier in any ingest output: report.csv, dataset.json (provenance included), slices.csv, the summary.

Real archives name files by SOPInstanceUID and folders by PatientID or SeriesInstanceUID; the report still has to say
which manifest row and which file a line means, so those path components become keyed pseudonyms.
"""

from __future__ import annotations

import csv
import re
import shutil
from pathlib import Path

import pydicom
import pytest

from medgan.config import load_config
from medgan.ingest import run_ingest
from tests.conftest import require
from tests.ingest.test_dicom import AXIAL, PHI, write_series


def _manifest(path: Path, sources: list[str], label: str = "x") -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["source", "label"])
        w.writerows([s, label] for s in sources)
    return path


def _identifiers(files: list[Path]) -> set[str]:
    out = set()
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True, force=True)
        for kw in ("PatientID", "PatientName", "AccessionNumber", "StudyInstanceUID", "SeriesInstanceUID",
                   "SOPInstanceUID"):  # fmt: skip
            value = str(ds.get(kw, "") or "").strip()
            if value:
                out.add(value)
    return out


def _assert_clean(out: Path, summary: str, identifiers: set[str]) -> None:
    """No identifier in the text of any output file or the summary; long ones (UIDs) not even in the binary files
    (a 3-byte name could occur in pixel bytes by chance). Short ones are matched as whole words (not inside a hex
    pseudonym), and short numbers (a StudyID of "134") only in the paths: a slice index may be 134 too."""
    import json

    text = [p.read_text(errors="replace").lower() for p in out.rglob("*") if p.suffix in (".csv", ".json")]
    binary = [p.read_bytes() for p in out.rglob("*") if p.is_file()]
    with open(out / "report.csv", newline="") as f:
        paths = [r["source"].lower() for r in csv.DictReader(f)]
    paths += [p.lower() for p in json.loads((out / "dataset.json").read_text())["provenance"]["sources"]]
    assert len(text) >= 3 and paths
    for ident in (i.lower() for i in identifiers if len(i) >= 3):  # "1" or "MR" identify nobody and are everywhere
        word = re.compile(rf"(?<![0-9a-z]){re.escape(ident)}(?![0-9a-z])")
        short_number = ident.isdigit() and len(ident) < 6
        for t in paths if short_number else [*text, summary.lower()]:
            assert not word.search(t), f"identifier {ident!r} in an output"
        if len(ident) >= 8:
            assert not any(ident.encode() in b.lower() for b in binary), f"identifier {ident!r} in an output file"


def _cfg(*sets: str):
    return load_config(sets=["ingest.workers=1", "ingest.min_foreground_fraction=0", *sets])


def test_uid_file_names_and_header_named_folders_leave_no_trace(shared_data, tmp_path):
    """mr_decubitus: file names are SOPInstanceUIDs and a folder is named by the PatientName ("HFS")."""
    base = require(shared_data / "dicom/mr_decubitus_t1_4positions")
    folders = sorted(p.name for p in base.iterdir() if p.is_dir())
    one_file = sorted((base / folders[0]).glob("*.dcm"))[0]
    sources = [*folders, f"{folders[0]}/{one_file.name}", "missing_1.2.840.10008.99.1.dcm"]
    manifest = _manifest(tmp_path / "m.csv", sources, "brain")
    rep = run_ingest(_cfg(), tmp_path / "ds", manifest=manifest, root=base, key_file=tmp_path / "k", progress=False)
    assert rep.n_ok == 5, rep.summary()
    ids = _identifiers(sorted(base.rglob("*.dcm")))
    assert "HFS" in ids and len(ids) > 40  # the name is also a folder's prefix; every file has its UID
    _assert_clean(tmp_path / "ds", rep.summary(), ids | {"1.2.840.10008.99.1"})
    # A user still finds the row and the file: row numbers, readable components, stable pseudonyms.
    rows = {r["manifest_row"]: r["source"] for r in rep.report}
    assert rows[5].startswith(rows[1] + "/0001_p-") and rows[5].endswith(".dcm")
    assert rows[2] == "HFDR_2_t1_fl2d_sag" and rows[4].startswith("p-") and rows[4].endswith("_3_t1_fl2d_sag")
    again = run_ingest(_cfg(), tmp_path / "ds2", manifest=manifest, root=base, key_file=tmp_path / "k", progress=False)
    assert [r["source"] for r in again.report] == [r["source"] for r in rep.report]


def test_patient_id_folders_of_pydicom_dicomdirtests(tmp_path):
    """pydicom's dicomdirtests: folders 77654033 and 98892003 are PatientIDs (Doe^Archibald and another)."""
    import pydicom.data

    tests = Path(pydicom.data.__file__).parent / "test_files" / "dicomdirtests"
    root = tmp_path / "root"
    shutil.copytree(tests, root / "dicomdirtests")
    sources = ["dicomdirtests/77654033", "dicomdirtests/98892003", "dicomdirtests/77654033/CR1/6154"]
    manifest = _manifest(tmp_path / "m.csv", sources)
    rep = run_ingest(_cfg(), tmp_path / "ds", manifest=manifest, root=root, key_file=tmp_path / "k", progress=False)
    assert rep.n_slices > 0, rep.summary()
    ids = _identifiers([p for p in (root / "dicomdirtests").rglob("*") if p.is_file() and p.name != "DICOMDIR"])
    assert {"77654033", "Doe^Archibald"} <= ids  # folder 77654033 is Doe^Archibald's PatientID
    _assert_clean(tmp_path / "ds", rep.summary(), ids | {"Doe", "Archibald", "98892003"})
    assert all(r["source"].startswith("dicomdirtests/p-") for r in rep.report)


def test_a_series_in_folders_named_by_its_patient_and_series(tmp_path):
    """A written series under <PatientName>_<PatientID>/<SeriesInstanceUID>/, a broken file beside it, and the
    manifest's patient id in a NIfTI's name: none of them in any output, the reasons included."""
    import nibabel as nib
    import numpy as np

    root = tmp_path / "root"
    staging, uid = write_series(tmp_path / "staging", AXIAL)
    folder = root / f"Doe_Jane_{PHI[1]}" / uid
    shutil.copytree(staging, folder)
    (folder / f"{uid}.9.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00garbage")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), root / "MRN-5550123_t1.nii.gz")
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        f"source,label,patient\nDoe_Jane_{PHI[1]}/{uid},ct,\nMRN-5550123_t1.nii.gz,ct,MRN-5550123\n"
        f"Doe_Jane_{PHI[1]}/{uid}/{uid}.9.dcm,ct,\n"
    )
    rep = run_ingest(_cfg(), tmp_path / "ds", manifest=manifest, root=root, key_file=tmp_path / "k", progress=False)
    assert rep.report[0]["status"] == "ok" and rep.report[2]["status"] == "skipped", rep.summary()
    ids = _identifiers(sorted(folder.glob("IM*"))) | {"Doe", "Jane", "MRN-5550123", "5550123", uid}
    _assert_clean(tmp_path / "ds", rep.summary(), ids)
    assert rep.report[0]["source"].count("/") == 1 and rep.report[0]["source"].count("p-") == 4  # Doe, Jane, ID; UID
    assert "not a DICOM file" in rep.report[2]["reason"] or "corrupt header" in rep.report[2]["reason"]


def test_the_key_is_never_written_inside_the_dataset_or_its_parts(tmp_path):
    import nibabel as nib
    import numpy as np

    root = tmp_path / "root"
    root.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), root / "a.nii.gz")
    manifest = _manifest(tmp_path / "m.csv", ["a.nii.gz"])
    with pytest.raises(ValueError, match="ds.parts, a folder ingest writes"):
        run_ingest(_cfg(), tmp_path / "ds", manifest=manifest, root=root, key_file=tmp_path / "ds.parts" / "k")
    assert not (tmp_path / "ds.parts" / "k").exists()


def test_a_mask_named_by_an_id_is_redacted_in_its_reason(tmp_path):
    import nibabel as nib
    import numpy as np

    root = tmp_path / "root"
    root.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), root / "ct.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((4, 4), np.int16), np.eye(4)), root / "77654033_seg.nii.gz")
    manifest = tmp_path / "m.csv"
    manifest.write_text("source,label,mask\nct.nii.gz,,77654033_seg.nii.gz\n")
    rep = run_ingest(_cfg(), tmp_path / "ds", manifest=manifest, root=root, key_file=tmp_path / "k", progress=False)
    assert "a label map must be 3-D" in rep.report[0]["reason"] and "77654033" not in rep.summary()
