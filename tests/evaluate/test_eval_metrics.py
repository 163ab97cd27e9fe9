"""Evaluation metrics on known cases: identical sets, shifted sets, copies, noise, and the promotion gates."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medgan.config import EvalConfig
from medgan.evaluate import check_gates
from medgan.evaluate import metrics as M


@pytest.fixture(scope="module")
def feats() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(300, 16))


def test_identical_sets_give_zero_fd_and_full_precision_recall(feats):
    assert M.frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-6)
    assert M.precision_recall(feats, feats, k=3) == (1.0, 1.0)
    density, coverage = M.density_coverage(feats, feats, k=5)
    assert coverage == 1.0 and density >= 1.0


def test_fd_and_kid_grow_with_a_shift(feats):
    other = np.random.default_rng(1).normal(size=feats.shape)
    fds = [M.frechet_distance(feats, other + s) for s in (0.0, 0.5, 1.0)]
    assert fds[0] < fds[1] < fds[2]
    # A mean shift of s in every one of 16 dims adds 16 s^2 to the FD.
    assert fds[2] - fds[0] == pytest.approx(16.0, rel=0.25)
    kids = [M.kernel_inception_distance(feats, other + s, n_subsets=5, subset_size=200)[0] for s in (0.0, 1.0)]
    assert abs(kids[0]) < 0.05 < kids[1]


def test_disjoint_sets_have_no_precision_or_recall(feats):
    assert M.precision_recall(feats, feats + 100.0) == (0.0, 0.0)
    assert M.density_coverage(feats, feats + 100.0) == (0.0, 0.0)


def test_ms_ssim_identical_is_one_and_noise_is_lower():
    rng = np.random.default_rng(0)
    noise = rng.uniform(-1, 1, (6, 1, 128, 128)).astype(np.float32)
    assert M.ms_ssim(noise, noise) == pytest.approx(np.ones(6), abs=1e-4)
    assert M.ms_ssim(noise, noise[::-1].copy()).max() < 0.5
    # Within-class: a class of one repeated image scores ~1, a class of noise much lower.
    images = np.concatenate([np.repeat(noise[:1], 6, axis=0), noise])
    labels = np.array([0] * 6 + [1] * 6)
    per_class, pairs = M.within_class_ms_ssim(images, labels, 2, n_pairs=8)
    assert per_class[0] == pytest.approx(1.0, abs=1e-4) and per_class[1] < 0.5 and pairs > 0


def test_nearest_neighbours_find_exact_copies_and_flag_them():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(50, 64)).astype(np.float32)
    test = rng.normal(size=(20, 64)).astype(np.float32)
    synthetic = np.concatenate([train[[3, 7]], rng.normal(size=(8, 64)).astype(np.float32)])
    d, j = M.nearest_neighbours(synthetic, train)
    assert d[:2].tolist() == [0.0, 0.0] and j[:2].tolist() == [3, 7]
    d_test, _ = M.nearest_neighbours(test, train)
    flagged, threshold = M.near_copies(d, d_test, ratio=0.5)
    assert flagged.tolist() == [True, True] + [False] * 8
    assert threshold == pytest.approx(0.5 * np.median(d_test))
    with pytest.raises(ValueError, match="test split is empty"):
        M.near_copies(d, np.zeros(0), 0.5)


def test_pixel_vectors_downsample_by_area():
    x = np.zeros((2, 1, 128, 128), dtype=np.float16)
    x[1, 0, :2, :2] = 1.0
    v = M.pixel_vectors(x, side=64)
    assert v.shape == (2, 4096) and v[0].max() == 0 and v[1, 0] == pytest.approx(1.0)


def test_classification_scores_and_per_class_accuracy():
    labels = np.array([0, 0, 1, 1, 2, 2])
    perfect = np.eye(3)[labels] * 0.9 + 0.1 / 3
    assert M.classification_scores(labels, perfect) == {"accuracy": 1.0, "balanced_accuracy": 1.0, "macro_auc": 1.0}
    always0 = np.tile([0.8, 0.1, 0.1], (6, 1))
    s = M.classification_scores(labels, always0)
    assert s["balanced_accuracy"] == pytest.approx(1 / 3) and s["macro_auc"] == pytest.approx(0.5)
    overall, per = M.per_class_accuracy(np.array([0, 1, 1, 1]), np.array([0, 0, 1, 1]), 3)
    assert overall == 0.75 and per[:2] == [0.5, 1.0] and math.isnan(per[2])


def test_gates_refuse_and_accept_as_configured():
    good = {"tstr_trtr_ratio": 0.85, "near_copy_fraction": 0.0, "class_fidelity": 0.9, "recall": 0.5}
    cfg = EvalConfig(gate_min_tstr_ratio=0.7, gate_max_near_copy_fraction=0.01, gate_min_class_fidelity=0.5)
    assert all(g.passed for g in check_gates(good, cfg))
    bad = dict(good, near_copy_fraction=0.2, tstr_trtr_ratio=0.5, recall=0.0)
    failed = [g.metric for g in check_gates(bad, cfg) if not g.passed]
    assert failed == ["tstr_trtr_ratio", "near_copy_fraction", "recall"]
    # The same metrics pass once the configured thresholds allow them; a missing or NaN metric always fails.
    lenient = EvalConfig(
        gate_min_tstr_ratio=0.4, gate_max_near_copy_fraction=0.25, gate_min_class_fidelity=0.5, gate_min_recall=0
    )
    assert all(g.passed for g in check_gates(bad, lenient))
    nan = dict(good, class_fidelity=float("nan"))
    assert [g.metric for g in check_gates(nan, cfg) if not g.passed] == ["class_fidelity"]
    assert not check_gates({}, lenient)[0].passed
    assert "FAIL" in check_gates(bad, cfg)[0].describe()


def test_a_figure_that_is_not_measurable_fails_its_gate_with_the_reason():
    reason = "the test split has one class (liver): a classifier that always answers it would score 1"
    # Even a value that would pass is refused once the figure is marked unmeasurable.
    gates = check_gates({"tstr_trtr_ratio": 1.0, "near_copy_fraction": 0.0, "class_fidelity": 1.0, "recall": 1.0},
                        EvalConfig(), {"tstr_trtr_ratio": reason})  # fmt: skip
    g = gates[0]
    assert not g.passed and g.value is None and g.reason == reason
    assert g.describe() == f"FAIL: TSTR/TRTR ratio = not measurable: {reason} (needs >= 0.7; metric tstr_trtr_ratio)"
    assert all(x.passed for x in gates[1:])


def test_default_gates_mean_something():
    cfg = EvalConfig()
    # Class fidelity well above chance for two classes (0.5); recall above zero; a ratio that keeps most of the utility.
    assert cfg.gate_min_class_fidelity >= 0.7 and cfg.gate_min_recall > 0 and cfg.gate_min_tstr_ratio >= 0.7
    collapsed = {"tstr_trtr_ratio": 0.5, "near_copy_fraction": 0.0, "class_fidelity": 0.5, "recall": 0.0}
    failed = {g.metric for g in check_gates(collapsed, cfg) if not g.passed}
    assert failed == {"tstr_trtr_ratio", "class_fidelity", "recall"}
