"""The regression corpus: every file under ../shared/data/dicom/odd, every file pydicom ships as test data, and the
hostile files of `test_hostile`, one manifest row each, in one ingest in a fresh process.

None may crash or hang, each lands or is skipped with a specific one-line reason, and the process's memory stays
bounded although the crafted headers claim 1-8 GB. The counts are printed (``pytest -s``) and written to
``$MEDGAN_CORPUS_REPORT`` when that is set.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import require
from tests.ingest.test_hostile import extension_bomb, gzip_bomb, rle_bomb, small_nifti, vox_offset_bomb

ROOT = Path(__file__).resolve().parents[2]
MAX_RSS_MB = 1500  # the whole ingest process; a bomb read would need 1-8 GB
# Reasons that only say an exception escaped (a type name first): the reader did not explain the file.
_UNEXPLAINED = re.compile(r"^(\w+Error|Exception|worker failed)\b|Traceback")


def pydicom_test_files() -> list[Path]:
    """Every file pydicom ships as test data (test_files and charset_files, recursively: what ``get_testdata_files``
    lists offline, without its attempt to download more)."""
    import pydicom.data

    base = Path(pydicom.data.__file__).parent
    return sorted(p for d in ("test_files", "charset_files") for p in (base / d).rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts)  # fmt: skip


def _corpus(shared_data: Path, root: Path) -> list[str]:
    """Copy the corpus under `root` (a copy: a symlink out of the root would be refused); the rows' paths."""
    rows = []
    odd = require(shared_data / "dicom" / "odd")
    for f in sorted(p for p in odd.rglob("*") if p.is_file()):
        rel = Path("odd") / f.relative_to(odd)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, root / rel)
        rows.append(rel.as_posix())
    for i, f in enumerate(pydicom_test_files()):
        rel = Path("pydicom") / f"{i:03d}_{Path(f).name}"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, root / rel)
        rows.append(rel.as_posix())
    crafted = root / "crafted"
    crafted.mkdir()
    vox_offset_bomb(crafted / "offset.nii.gz")
    gzip_bomb(crafted / "bomb.nii.gz")
    extension_bomb(crafted / "ext.nii.gz")
    rle_bomb(crafted / "rle32768.dcm")
    rle_bomb(crafted / "rle65535.dcm", 65535)
    small_nifti(crafted / "fine.nii.gz")
    os.mkfifo(crafted / "pipe.dcm")
    (crafted / "zero.dcm").symlink_to("/dev/zero")
    (crafted / "loop.dcm").symlink_to(crafted / "loop.dcm")
    (crafted / "dangling.dcm").symlink_to(root / "nothing")
    rows += [f"crafted/{p.name}" for p in sorted(crafted.iterdir())]
    return rows


def _kind(reason: str) -> str:
    """A skip reason without the file's name and counts: what went wrong, for the summary."""
    reason = re.sub(r"^(no DICOM image series found|no usable slices): ", "", reason)
    reason = re.sub(r"^[^ ]+\.nii(\.gz)?: ", "", reason)  # a NIfTI reason starts with the file's name
    reason = re.sub(r"^\d+x ", "", reason)
    return re.sub(r"[\d]+", "N", reason.split(";")[0].split(" (")[0])[:70]


def test_the_corpus_lands_or_is_skipped_with_a_reason_in_bounded_memory(shared_data, tmp_path):
    root = tmp_path / "root"
    rows = _corpus(shared_data, root)
    manifest = tmp_path / "m.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["source", "label"])
        w.writerows([r, "x"] for r in rows)
    script = textwrap.dedent(f"""
        import json, resource
        from pathlib import Path
        from medgan.config import load_config
        from medgan.ingest import run_ingest
        tmp = Path({str(tmp_path)!r})
        cfg = load_config(sets=["ingest.workers=1", "ingest.min_foreground_fraction=0"])
        rep = run_ingest(cfg, tmp / "ds", manifest=tmp / "m.csv", root=tmp / "root", key_file=tmp / "key" / "k",
                         progress=False)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        print(json.dumps({{"report": rep.report, "max_rss_mb": rss, "n_slices": rep.n_slices}}))
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("the corpus ingest hung (no result after 240 s)")
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    report = res["report"]
    assert len(report) == len(rows)
    for r in report:
        reason = r["reason"]
        assert "\n" not in reason and len(reason) <= 300
        if r["status"] == "skipped":
            assert reason and not _UNEXPLAINED.search(reason), (r["source"], reason)
    landed = [r for r in report if r["status"] == "ok"]
    skipped = Counter(_kind(r["reason"]) for r in report if r["status"] == "skipped")
    by_name = {r["source"]: r for r in report}
    assert by_name["crafted/fine.nii.gz"]["status"] == "ok"
    bombs = ("offset.nii.gz", "bomb.nii.gz", "ext.nii.gz", "rle32768.dcm", "rle65535.dcm", "pipe.dcm", "zero.dcm")
    for bomb in (*bombs, "loop.dcm"):
        assert by_name[f"crafted/{bomb}"]["status"] == "skipped"
    assert res["max_rss_mb"] < MAX_RSS_MB
    summary = {
        "rows": len(report),
        "landed": len(landed),
        "skipped_with_reason": len(report) - len(landed),
        "slices": res["n_slices"],
        "max_rss_mb": res["max_rss_mb"],
        "skip_reasons": dict(skipped.most_common()),
    }
    print("corpus:", json.dumps(summary, indent=1))
    if os.environ.get("MEDGAN_CORPUS_REPORT"):
        Path(os.environ["MEDGAN_CORPUS_REPORT"]).write_text(json.dumps(summary, indent=1))
    assert len(landed) >= 60  # most of pydicom's images and the odd series land
