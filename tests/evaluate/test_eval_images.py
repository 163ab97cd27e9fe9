"""evaluate on a tiny separable 2-class dataset: good, memorizing and shuffled-label "generators", reports, exports."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medgan.config import Config, load_config
from medgan.dataset import SliceDataset
from medgan.evaluate import evaluate_generator, evaluate_images, run_evaluate
from medgan.evaluate.features import Recipe, predict, real_classifier
from medgan.models.generator import Generator, LoadedGenerator

sys.path.insert(0, str(Path(__file__).parent))
from eval_helpers import CLASSES, make_dataset, patterns  # noqa: E402


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> SliceDataset:
    root = tmp_path_factory.mktemp("real")
    return SliceDataset.open(make_dataset(root / "ds", {"train": 40, "val": 10, "test": 20}))


@pytest.fixture
def cfg() -> Config:
    return load_config(
        sets=[
            "eval.n_per_class=20",
            "eval.feature_epochs=20",
            "eval.classifier_epochs=20",
            "eval.diversity_pairs=8",
            "eval.kid_subsets=5",
            "eval.gate_min_class_fidelity=0.8",
            "eval.classifier_min_steps=0",
        ]
    )


@pytest.fixture(scope="module")
def cache(tmp_path_factory, real) -> Path:
    """A cache holding the domain network of `real`, trained once for the module."""
    root = tmp_path_factory.mktemp("cache")
    net, info = real_classifier(real, Recipe(epochs=20, min_steps=0), root)
    assert not info["cached"] and info["n_train"] == 80 and info["val_accuracy"] > 0.9
    return root


def fresh(n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    labels = np.repeat([0, 1], n_per_class)
    return patterns(labels, seed), labels


def test_good_synthetic_data_passes(real, cfg, cache, tmp_path):
    images, labels = fresh(20, seed=100)
    r = evaluate_images(images, labels, real, cfg, tmp_path / "rep", cache_dir=cache)
    m = r.metrics
    assert m["domain_val_accuracy"] > 0.9 and m["class_fidelity"] > 0.9
    assert m["tstr_balanced_accuracy"] > 0.85 and m["tstr_trtr_ratio"] > 0.85
    assert m["near_copy_fraction"] == 0.0
    # Utility over 3 classifier seeds: mean and spread, macro AUC beside balanced accuracy, real+synthetic vs real.
    assert m["classifier_seeds"] == 3 and r.not_measurable == {}
    for who in ("tstr", "trtr", "mixed"):
        assert 0 <= m[f"{who}_balanced_accuracy_std"] < 0.2 and m[f"{who}_macro_auc"] > 0.9
    assert m["mixed_balanced_accuracy"] > 0.85 and abs(m["mixed_trtr_delta"]) < 0.15 and m["tstr_trtr_auc_ratio"] > 0.9
    utility = json.loads((r.report_dir / "metrics.json").read_text())["details"]["utility"]
    assert utility["seeds"] == [0, 1, 2] and len(utility["per_seed"]["tstr"]) == 3
    assert "± " in r.summary() and "real + synthetic" in r.summary()
    assert json.loads((r.report_dir / "metrics.json").read_text())["details"]["domain_network"]["cached"] is True
    assert m["n_synthetic"] == 40 and m["n_train"] == 80 and m["n_test"] == 40 and m["n_eval"] == 40
    assert r.gates_passed, r.summary()
    # The report: strict JSON with the same metrics, a Markdown table, figures and the domain network.
    data = json.loads((r.report_dir / "metrics.json").read_text())
    assert data["metrics"]["fd"] == pytest.approx(m["fd"]) and len(data["details"]["per_class"]) == 2
    md = (r.report_dir / "report.md").read_text()
    assert "| Frechet distance" in md and "TSTR" in md and "| left |" in md and "| real train + synthetic |" in md
    for name in ("samples.png", "nearest_pairs.png", "domain_network.pt"):
        assert (r.report_dir / name).stat().st_size > 0
    assert "Gates:" in r.summary() and "pass: TSTR/TRTR ratio" in r.summary()


def test_domain_network_is_cached_by_dataset_hash_and_recipe(real, cache):
    # The domain network (seed 0) doubles as the first TRTR classifier; TRTR seeds 1 and 2 are cached beside it.
    files = sorted((cache / "features").glob(f"{real.content_hash[:16]}-*.pt"))
    digests = {Recipe(epochs=20, min_steps=0, seed=s).digest() for s in (0, 1, 2)}
    assert {f.stem.split("-")[1] for f in files} <= digests and len(files) >= 1
    net, info = real_classifier(real, Recipe(epochs=20, min_steps=0), cache)
    path = cache / "features" / f"{real.content_hash[:16]}-{Recipe(epochs=20, min_steps=0).digest()}.pt"
    assert info["cached"] and info["cache_path"] == str(path) and info["dataset_hash"] == real.content_hash
    assert Recipe(epochs=21).digest() != Recipe(epochs=20).digest()
    probs, feats = predict(net, real.images[:3])
    assert probs.shape == (3, 2) and feats.shape == (3, 128)


def test_generator_returning_training_images_is_flagged(real, cfg, cache, tmp_path):
    train = real.indices("train")
    images, labels = np.asarray(real.images[train], dtype=np.float32), real.labels[train]
    r = evaluate_images(images, labels, real, cfg, tmp_path / "copy", cache_dir=cache)
    assert r.metrics["near_copy_fraction"] == 1.0 and r.metrics["nn_distance_ratio"] < 1e-3
    assert r.metrics["near_copy_fraction_features"] == 1.0 and r.metrics["near_copy_fraction_real"] == 0.0
    assert [g.metric for g in r.gates if not g.passed] == ["near_copy_fraction"]
    pairs = json.loads((r.report_dir / "metrics.json").read_text())["details"]["memorization"]["closest_pairs"]
    assert pairs[0]["distance"] == 0.0


def test_shuffled_labels_give_low_fidelity_and_low_tstr(real, cfg, cache, tmp_path):
    images, labels = fresh(20, seed=102)
    shuffled = np.random.default_rng(0).permutation(labels)
    r = evaluate_images(images, shuffled, real, cfg, tmp_path / "shuf", cache_dir=cache)
    assert r.metrics["class_fidelity"] < 0.7
    assert r.metrics["tstr_balanced_accuracy"] < 0.75 and r.metrics["tstr_trtr_ratio"] < 0.75
    failed = {g.metric for g in r.gates if not g.passed}
    assert failed == {"tstr_trtr_ratio", "class_fidelity"}


def test_evaluate_generator_samples_each_class(real, cfg, cache, tmp_path):
    torch.manual_seed(0)
    G = Generator(num_classes=2, z_dim=16, width=4, max_channels=16, embed_dim=8)
    loaded = LoadedGenerator(G, CLASSES, None, {"checkpoint": "ckpt-000001.pt", "dataset_hash": "other"})
    cfg.eval.n_per_class = 6
    r = evaluate_generator(loaded, real, cfg, tmp_path / "g", cache_dir=cache)
    assert r.metrics["n_synthetic"] == 12 and r.info["checkpoint"] == "ckpt-000001.pt"
    assert any("trained on dataset" in n for n in r.notes)
    with pytest.raises(ValueError, match="classes"):
        evaluate_generator(LoadedGenerator(G, ["a", "b"], None), real, cfg, tmp_path / "x", cache_dir=cache)


def test_run_evaluate_reads_an_exported_dataset(real, cfg, cache, tmp_path):
    # Classes in the other order: the export's labels are mapped to the real dataset's by name.
    export = make_dataset(tmp_path / "export", {"train": 20}, seed=103, synthetic=True, classes=CLASSES[::-1])
    r = run_evaluate(cfg, str(export), real.path, out_dir=tmp_path / "rep", promote=False, cache_dir=cache)
    assert r.metrics["class_fidelity"] < 0.2  # every label is swapped by the reversed class list
    assert not r.promoted and any("no registry step" in n for n in r.notes)
    with pytest.raises(ValueError, match="--promote needs a registered model"):
        run_evaluate(cfg, str(export), real.path, out_dir=tmp_path / "rep2", promote=True, cache_dir=cache)
    with pytest.raises(ValueError, match="synthetic dataset"):
        run_evaluate(cfg, str(real.path), export, out_dir=tmp_path / "rep3", promote=False, cache_dir=cache)


def test_evaluated_images_are_the_exported_ones(tmp_path):
    """One seed rule: evaluation's image (class, index) is the file `medgan export` writes for it, bit for bit."""
    from medgan.config import ModelConfig
    from medgan.evaluate import sample_for_evaluation
    from medgan.export import export_dataset, read_image

    torch.manual_seed(0)
    mc = ModelConfig(z_dim=16, width=4, g_max_channels=16, embed_dim=8)
    G = Generator(num_classes=2, z_dim=16, width=4, max_channels=16, embed_dim=8)
    loaded = LoadedGenerator(G, CLASSES, mc, {"checkpoint": "ckpt-000001.pt"})
    cfg = load_config(sets=["eval.n_per_class=5", "eval.seed=7", "eval.batch_size=3"])
    cfg.export.format, cfg.export.n_per_class, cfg.export.seed, cfg.export.batch_size = "npy", 5, 7, 3
    cfg.export.device = "cpu"
    images, labels, seeds = sample_for_evaluation(loaded, cfg)
    out = export_dataset(loaded, cfg, tmp_path / "export", progress=False).out
    rows = list(csv.DictReader((out / "manifest.csv").open()))
    assert [int(r["seed"]) for r in rows] == seeds.tolist() and [int(r["label"]) for r in rows] == labels.tolist()
    exported = np.stack([read_image(out / r["file"]) for r in rows])
    assert exported.shape == images.shape and np.array_equal(exported, images)
    # Seeds differ per (class, index), so the classes are not one image repeated.
    assert len(set(seeds.tolist())) == 10 and not np.array_equal(images[0], images[5])
