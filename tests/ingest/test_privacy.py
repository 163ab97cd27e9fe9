"""Privacy: keyed pseudonyms, the key file, patient-level stratified splits, near-duplicate grouping."""

from __future__ import annotations

import stat
from collections import Counter

import numpy as np
import pytest

from medgan.ingest.image2d import read_image2d
from medgan.ingest.privacy import (
    Pseudonymizer,
    assign_splits,
    group_near_duplicates,
    load_key,
    perceptual_hash,
)
from tests.conftest import require


def test_key_file_created_private_and_reused(tmp_path):
    import os

    kf = tmp_path / "keys" / "deeper" / "pseudonym.key"
    old = os.umask(0o022)  # a permissive umask: the key's folders are 0700 all the same
    try:
        key = load_key(kf)
    finally:
        os.umask(old)
    assert len(key) == 32 and stat.S_IMODE(kf.stat().st_mode) == 0o600
    assert stat.S_IMODE(kf.parent.stat().st_mode) == 0o700 and stat.S_IMODE(kf.parent.parent.stat().st_mode) == 0o700
    assert load_key(kf) == key
    kf.chmod(0o644)
    with pytest.warns(UserWarning, match="can be read by other users"):
        assert load_key(kf) == key
    for inside in ("ds", "ds.partial", "ds.parts", "ds.old"):  # ingest writes and deletes these
        with pytest.raises(ValueError, match=f"lies inside {inside}, a folder ingest writes"):
            load_key(tmp_path / inside / "key", dataset=tmp_path / "ds")
    assert not (tmp_path / "ds").exists()


def test_default_key_file_is_outside_the_repository():
    from pathlib import Path

    from medgan.ingest.privacy import DEFAULT_KEY_FILE

    repo = Path(__file__).resolve().parents[2]
    assert not Path(DEFAULT_KEY_FILE).expanduser().resolve().is_relative_to(repo)
    assert ".medgan/" in (repo / ".gitignore").read_text().split()  # where the demo keeps a key of its own


def test_redactor_replaces_uids_long_numbers_and_header_values():
    from medgan.ingest.privacy import Redactor

    pseudonym = Pseudonymizer(b"k" * 32)
    r = Redactor(pseudonym, {"Doe^Archibald", "Doe", "Archibald", "KiTS-00072"})
    shown = r.path("kits-00072_1.3.6.1.4.1.9328.50.1.2/0001_1.3.12.2.1107.5.2.dcm")
    assert "00072" not in shown and "1.3." not in shown and shown.endswith(".dcm") and shown.count("p-") == 3
    assert r.path("dicomdirtests/77654033/CR1/6154") == f"dicomdirtests/{pseudonym('path:77654033')}/CR1/6154"
    assert r.path("scans/ARCHIBALD_doe/ct") == r.path("scans/archibald_DOE/ct")  # the same file, the same name
    assert "Archibald" not in r.text("series 1/2 skipped: Archibald's 1.2.840.113619.2.55 scan is 1.5 mm")
    assert "1.5 mm" in r.text("step 1.5 mm, 12345678 bytes")  # numbers in messages stay readable


def test_pseudonyms_are_keyed_stable_and_opaque():
    a, b = Pseudonymizer(b"k" * 32), Pseudonymizer(b"q" * 32)
    p = a("patient:crlab")
    assert p == a("patient:crlab") and p.startswith("p-") and len(p) == 18
    int(p[2:], 16)
    assert p != b("patient:crlab") and p != a("patient:crlab2")
    assert "crlab" not in p


def test_splits_are_patient_level_stratified_and_stable():
    patients = {f"p-{i:016x}": ("tumour" if i % 3 == 0 else "normal") for i in range(300)}
    s1 = assign_splits(patients, [0.8, 0.1, 0.1], seed=0)
    assert s1 == assign_splits(dict(reversed(patients.items())), [0.8, 0.1, 0.1], seed=0)  # order-free
    for cls in ("tumour", "normal"):
        n = Counter(s1[p] for p, c in patients.items() if c == cls)
        total = sum(n.values())
        assert abs(n["train"] / total - 0.8) < 0.02 and abs(n["val"] / total - 0.1) < 0.02
    assert assign_splits(patients, [0.8, 0.1, 0.1], seed=1) != s1  # the seed reshuffles
    fixed = assign_splits(patients, [0.8, 0.1, 0.1], fixed={"p-0000000000000000": "test"})
    assert fixed["p-0000000000000000"] == "test"
    with pytest.raises(ValueError, match="split_fractions"):
        assign_splits(patients, [0.8, 0.2])


def test_grouping_joins_near_duplicates_transitively():
    rng = np.random.default_rng(0)
    base = [rng.uniform(0, 1, (64, 64)) for _ in range(4)]
    images = [base[0], base[1], base[0] * 0.9 + 0.05, base[2], base[1].copy(), base[3]]
    groups = group_near_duplicates(np.stack([perceptual_hash(x) for x in images]), 2)
    assert groups.tolist() == [0, 1, 0, 3, 1, 5]
    assert group_near_duplicates(np.zeros((0, 4), np.uint64), 2).tolist() == []


def test_brain_mri_duplicates_grouped_and_distinct_slices_not(shared_data):
    folder = require(shared_data / "labelled_2d/brain_tumor_mri/Training/notumor")
    files = sorted(folder.glob("*.jpg"))[:400]
    images = [read_image2d(f) for f in files]
    groups = group_near_duplicates(np.stack([perceptual_hash(x) for x in images]), 2)
    members = Counter(groups.tolist())
    dup = [i for i, g in enumerate(groups) if members[g] > 1]
    assert dup, "this subset holds known duplicates"
    for i in dup:  # every grouped image is close to its group's first image
        a, b = images[i], images[groups[i]]
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.9
    assert len(members) > 0.6 * len(files)  # distinct slices stay apart
