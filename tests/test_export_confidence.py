"""medgan export --min-class-confidence: only samples the domain classifier assigns to their class with p >= P,
drawn in seed-rule order until each class has its count, and a filter that records itself."""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent / "evaluate"))
sys.path.insert(0, str(Path(__file__).parent))
from eval_helpers import CLASSES, make_dataset  # noqa: E402
from test_export import tiny_loaded  # noqa: E402

from medgan.config import Config  # noqa: E402
from medgan.evaluate.features import predict  # noqa: E402
from medgan.export import export_dataset, read_image  # noqa: E402
from medgan.export.confidence import domain_filter  # noqa: E402
from medgan.models.generator import LoadedGenerator  # noqa: E402
from medgan.sampling import image_seed, sample_class  # noqa: E402

N, BATCH = 4, 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("conf")
    real = make_dataset(root / "real", {"train": 16, "val": 4})
    src = tiny_loaded()
    loaded = LoadedGenerator(src.G, CLASSES, src.model_cfg, src.info)
    cfg = Config()
    cfg.eval.feature_epochs, cfg.eval.classifier_min_steps, cfg.eval.cache_dir = 1, 20, str(root / "cache")
    cfg.export.format, cfg.export.n_per_class, cfg.export.batch_size, cfg.export.device = "npy", N, BATCH, "cpu"
    cfg.export.min_class_confidence = 0.5
    flt = domain_filter(cfg, loaded, real)
    # The candidates the filter will see: each class's first 2 batches under the seed rule, and their probabilities.
    probs = {
        c: predict(flt.domain, sample_class(loaded.G, c, 0, 2 * BATCH, 0, "cpu", BATCH)[0])[0][:, c] for c in (0, 1)
    }
    return dict(root=root, real=real, loaded=loaded, cfg=cfg, flt=flt, probs=probs)


def test_keeps_only_confident_samples_and_records_the_filter(setup, tmp_path):
    cfg, flt, probs = setup["cfg"], setup["flt"], setup["probs"]
    # P = the lower of the classes' median candidate probabilities: that class rejects about half its candidates, the
    # other at most half, so both fill up within the candidates above.
    p = float(min(np.median(probs[0]), np.median(probs[1])))
    flt = replace(flt, min_confidence=p)
    out = export_dataset(setup["loaded"], cfg, tmp_path / "syn", progress=False, confidence=flt).out
    rows = list(csv.DictReader((out / "manifest.csv").open()))
    assert len(rows) == 2 * N and {r["class_name"] for r in rows} == set(CLASSES)
    record = json.loads((out / "dataset.json").read_text())["export"]["class_confidence_filter"]
    assert record["min_class_confidence"] == p and record["classifier"]["dataset_hash"]
    for c, name in enumerate(CLASSES):
        mine = [r for r in rows if r["class_name"] == name]
        # The kept seeds are the first N candidates at or above P, in seed-rule order; the rejected ones are skipped.
        expected = [image_seed(0, c, i) for i in np.flatnonzero(probs[c] >= p)[:N]]
        assert [int(r["seed"]) for r in mine] == expected
        # Re-judge the written images: every one is confident, and its recorded confidence is what the network says.
        images = np.stack([read_image(out / r["file"]) for r in mine])
        judged = predict(flt.domain, images)[0][:, c]
        assert (judged >= p).all() and np.allclose(judged, [float(r["class_confidence"]) for r in mine], atol=1e-5)
        stats = record["per_class"][name]
        assert stats["kept"] == N and stats["draws"] % BATCH == 0 and stats["draws"] >= N
        assert stats["acceptance_rate"] == pytest.approx(stats["accepted"] / stats["draws"])
    assert min(v["acceptance_rate"] for v in record["per_class"].values()) < 1  # the filter did reject something
    assert f">= {p:g}" in (out / "README.md").read_text()
    datalist = json.loads((out / "datalist.json").read_text())["training"]
    assert all(e["class_confidence"] >= p - 1e-6 for e in datalist)


def test_a_class_that_cannot_fill_up_is_a_clear_error(setup, tmp_path):
    cfg, flt, probs = setup["cfg"], setup["flt"], setup["probs"]
    above_all = float(np.nextafter(max(probs[0].max(), probs[1].max()), 2.0))
    flt = replace(flt, min_confidence=above_all, max_draws_per_class=BATCH)
    with pytest.raises(ValueError, match=r"class 'left' kept 0 of 8 draws .*lower P"):
        export_dataset(setup["loaded"], cfg, tmp_path / "none", progress=False, confidence=flt)
    assert not (tmp_path / "none").exists()


def test_the_filter_needs_the_real_dataset_and_a_probability(setup):
    cfg, loaded = setup["cfg"], setup["loaded"]
    with pytest.raises(ValueError, match="needs --data"):
        domain_filter(cfg, loaded, None)
    cfg.export.min_class_confidence = 1.5
    with pytest.raises(ValueError, match=r"probability in \(0, 1\]"):
        domain_filter(cfg, loaded, setup["real"])
    cfg.export.min_class_confidence = 0.5


def test_cli_filters_with_the_real_dataset(setup, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from medgan.cli import main

    # The registry is not what this test is about: any reference loads the prepared generator.
    monkeypatch.setattr("medgan.tracking.registry.load_generator", lambda *a, **k: setup["loaded"])
    p = float(min(np.median(setup["probs"][0]), np.median(setup["probs"][1])))
    base = ["export", "--model", "models:/m@champion", "--n-per-class", str(N), "--format", "npy",
            "--min-class-confidence", f"{p!r}", "--set", f"export.batch_size={BATCH}", "--set", "export.device=cpu",
            "--set", "eval.feature_epochs=1", "--set", "eval.classifier_min_steps=20",
            "--set", f"eval.cache_dir={setup['root'] / 'cache'}"]  # fmt: skip
    res = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "x")])
    assert res.exit_code == 1 and "needs --data" in res.output
    res = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "syn"), "--data", str(setup["real"])])
    assert res.exit_code == 0, res.output
    assert "class-confidence filter" in res.output and "acceptance" in res.output
    rows = list(csv.DictReader((tmp_path / "syn" / "manifest.csv").open()))
    assert len(rows) == 2 * N and all(float(r["class_confidence"]) >= p - 1e-6 for r in rows)
