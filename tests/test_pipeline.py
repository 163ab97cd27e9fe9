"""End to end through the CLI, as users run it: the README's demo pipeline on the bundled real CT, and a privacy sweep
over everything medgan writes for real DICOM that carries volunteer identifiers."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medgan.dataset import SliceDataset
from tests.conftest import ROOT, require

MEDGAN = str(Path(sys.executable).with_name("medgan"))
# Identifiers of the volunteer in ../shared/data/dicom/mr_decubitus_t1_4positions (see its PROVENANCE.md).
FORBIDDEN = [b"stc_test", b"crlab", b"STC_TEST", b"CRLAB"]


def _env(work: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        MEDGAN_SKIP_SETUP="1",
        MEDGAN=MEDGAN,
        MEDGAN_WORKDIR=str(work),
        MLFLOW_TRACKING_URI=f"sqlite:///{work}/mlflow.db",
        MEDGAN_KEY_FILE=str(work / ".medgan" / "pseudonym.key"),
        PYTHONHASHSEED="0",
    )
    return env


def _run(cmd: list[str], work: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=work, env=_env(work), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    return p


@pytest.mark.slow
def test_demo_pipeline_end_to_end(tmp_path):
    p = _run(["bash", str(ROOT / "pipelines" / "demo.sh")], tmp_path)
    out = p.stdout

    # Ingest: both sources landed (DICOM J2K with empty UIDs + NIfTI), organ classes from the label maps.
    ds = SliceDataset.open(tmp_path / "datasets" / "sample")
    assert ds.classes == ["bladder", "kidney", "liver"]
    assert set(ds.splits) == {"train", "test"}
    with open(tmp_path / "datasets" / "sample" / "report.csv") as f:
        report = list(csv.DictReader(f))
    assert [r["status"] for r in report] == ["ok", "ok"], report
    assert (tmp_path / "datasets" / "sample" / "contact_sheet.png").is_file()

    # Train + register: a run, a checkpoint, a registered version with alias candidate.
    assert list((tmp_path / "runs").glob("*/ckpt-*.pt")), "no checkpoint written"
    assert "mlflow ui --backend-store-uri" in out
    assert "medgan-sample" in out and "candidate" in out

    # Evaluate: a report with the headline metrics.
    reports = list((tmp_path / "reports").glob("*/metrics.json"))
    assert reports, "evaluate wrote no metrics.json"
    metrics = json.loads(reports[0].read_text())
    flat = json.dumps(metrics)
    for key in ("fd", "class_fidelity", "tstr", "near_copy"):
        assert key in flat, f"{key} missing from {reports[0]}"
    # Two patients cannot give every split every class: what cannot be measured says why, nothing prints nan.
    summary = out[out.index("Evaluated ") : out.index("Report: ")]
    assert "not measurable: the test split has one class (liver)" in summary and "there is no val split" in summary
    assert re.search(r"\bnan\b", summary + flat, re.IGNORECASE) is None, summary
    assert metrics["metrics"]["class_fidelity"] >= 0 and metrics["metrics"]["fd"] > 0

    # Export: a synthetic slice dataset that reads like real data, 16 per class, PNGs and a datalist.
    syn = SliceDataset.open(tmp_path / "synthetic" / "sample")
    assert syn.synthetic and syn.classes == ds.classes
    assert np.bincount(syn.labels).tolist() == [16, 16, 16]
    assert len(list((tmp_path / "synthetic" / "sample" / "images").rglob("*.png"))) == 48
    assert json.loads((tmp_path / "synthetic" / "sample" / "datalist.json").read_text())["training"]


@pytest.mark.slow
def test_no_volunteer_identifier_in_anything_written(tmp_path, shared_data):
    src = require(shared_data / "dicom" / "mr_decubitus_t1_4positions")
    # The source really carries the identifiers, so a leak would be caught.
    raw = b"".join(p.read_bytes() for p in sorted(src.rglob("*")) if p.is_file() and p.suffix != ".md")
    assert any(f in raw for f in FORBIDDEN)

    manifest = tmp_path / "decubitus.csv"
    rows = [f"{d.name},{d.name.split('_')[0]},,MR,," for d in sorted(src.iterdir()) if d.is_dir()]
    manifest.write_text("source,label,patient,modality,split\n" + "\n".join(rows) + "\n")
    _run([MEDGAN, "ingest", "--manifest", str(manifest), "--root", str(src), "--out", "datasets/decub"], tmp_path)
    _run([MEDGAN, "info", "datasets/decub"], tmp_path)
    _run(
        [
            MEDGAN,
            "train",
            "--data",
            "datasets/decub",
            "--config",
            str(ROOT / "configs/train/cpu_smoke.yaml"),
            "--set",
            "train.total_kimg=0.064",
        ],
        tmp_path,
    )
    _run(
        [
            MEDGAN,
            "export",
            "--model",
            "models:/medgan-decub@candidate",
            "--n-per-class",
            "2",
            "--format",
            "dicom",
            "--out",
            "synthetic/decub",
        ],
        tmp_path,
    )

    leaks = []
    for p in tmp_path.rglob("*"):
        if p.is_file() and p != manifest:
            data = p.read_bytes()
            leaks += [f"{p.relative_to(tmp_path)}: {f.decode()}" for f in FORBIDDEN if f in data]
    assert not leaks, leaks
