"""run_evaluate end to end: a checkpoint (no registry) and a registered model promoted or refused by the gates."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from eval_helpers import CLASSES, make_dataset  # noqa: E402

from medgan.config import Config, load_config, to_dict  # noqa: E402
from medgan.dataset import SliceDataset  # noqa: E402
from medgan.evaluate import run_evaluate  # noqa: E402
from medgan.evaluate.features import Recipe, real_classifier  # noqa: E402
from medgan.models.generator import Generator  # noqa: E402

FAST = [
    "eval.n_per_class=8",
    "eval.feature_epochs=3",
    "eval.classifier_epochs=3",
    "eval.diversity_pairs=4",
    "eval.kid_subsets=3",
    "eval.classifier_min_steps=0",
    "eval.seeds=1",  # the spread over seeds is tested in test_eval_images
    "model.z_dim=16",
    "model.width=4",
    "model.g_max_channels=16",
    "model.embed_dim=8",
]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    ds = SliceDataset.open(make_dataset(root / "tiny", {"train": 12, "val": 4, "test": 6}))
    cache = root / "cache"
    real_classifier(ds, Recipe(epochs=3, min_steps=0), cache)
    torch.manual_seed(0)
    G = Generator(num_classes=2, z_dim=16, width=4, max_channels=16, embed_dim=8).eval()
    return dict(root=root, ds=ds, cache=cache, G=G)


def config(uri: str, *sets: str) -> Config:
    return load_config(sets=[*FAST, f"track.tracking_uri={uri}", *sets])


def test_checkpoint_ref_skips_the_registry(env, tmp_path, monkeypatch):
    cfg = config("")
    ckpt = tmp_path / "ckpt-000000064.pt"
    torch.save(
        {
            "G_ema": env["G"].state_dict(),
            "config": to_dict(cfg),
            "classes": CLASSES,
            "dataset_hash": env["ds"].content_hash,
        },
        ckpt,
    )
    monkeypatch.chdir(tmp_path)
    r = run_evaluate(cfg, str(ckpt), env["ds"].path, out_dir=None, promote=False, cache_dir=env["cache"])
    assert r.report_dir == Path("reports") / "ckpt-000000064" and (tmp_path / r.report_dir / "report.md").is_file()
    assert r.run_id is None and not r.promoted and any("nothing logged" in n for n in r.notes)
    assert not (tmp_path / "mlflow.db").exists()
    with pytest.raises(ValueError, match="registered model version"):
        run_evaluate(cfg, str(ckpt), env["ds"].path, out_dir=tmp_path / "x", promote=True, cache_dir=env["cache"])


def test_registered_model_is_promoted_only_when_gates_pass(env, tmp_path, monkeypatch):
    from medgan.tracking.runs import Tracker

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = config(uri)
    tracker = Tracker(cfg.track)
    tracker.start(cfg, env["ds"], run_name="tiny-eval")
    model_uri = tracker.register_generator(env["G"], cfg, CLASSES, env["ds"].content_hash, {})
    tracker.finish()
    name, version = model_uri.removeprefix("models:/").split("/")
    ref = f"models:/{name}@candidate"

    # An untrained generator cannot reach a TSTR/TRTR ratio of 2: refused, champion untouched, the failed gate named.
    strict = config(uri, "eval.gate_min_tstr_ratio=2.0")
    r = run_evaluate(strict, ref, env["ds"].path, out_dir=tmp_path / "strict", promote=True, cache_dir=env["cache"])
    assert not r.promoted and r.run_id and any("TSTR/TRTR ratio" in n for n in r.notes)
    assert "FAIL: TSTR/TRTR ratio" in r.summary()
    client = tracker.client
    assert "champion" not in client.get_registered_model(name).aliases
    assert client.get_model_version(name, version).tags["eval.run_id"] == r.run_id
    assert "tstr_trtr_ratio" in client.get_run(r.run_id).data.metrics  # numeric metrics on the evaluation run

    lenient = config(
        uri,
        "eval.gate_min_tstr_ratio=0",
        "eval.gate_max_near_copy_fraction=1",
        "eval.gate_min_class_fidelity=0",
        "eval.gate_min_recall=0",
    )
    monkeypatch.chdir(tmp_path)
    r = run_evaluate(lenient, ref, env["ds"].path, out_dir=None, promote=True, cache_dir=env["cache"])
    assert r.promoted and "Promoted" in r.summary()
    assert (
        r.report_dir == Path("reports") / f"{name}-v{version}" and (tmp_path / r.report_dir / "metrics.json").is_file()
    )
    assert str(client.get_registered_model(name).aliases["champion"]) == version


def test_one_class_model_is_refused_with_reasons(tmp_path):
    """A model of a one-class dataset used to pass every gate (fidelity and TSTR are trivially 1 with one class)."""
    from medgan.tracking.runs import Tracker

    ds = SliceDataset.open(make_dataset(tmp_path / "one", {"train": 12, "test": 6}, classes=["left"]))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = config(uri)
    torch.manual_seed(0)
    G = Generator(num_classes=1, z_dim=16, width=4, max_channels=16, embed_dim=8).eval()
    tracker = Tracker(cfg.track)
    tracker.start(cfg, ds, run_name="one-class")
    model_uri = tracker.register_generator(G, cfg, ["left"], ds.content_hash, {})
    tracker.finish()
    name = model_uri.removeprefix("models:/").split("/")[0]
    r = run_evaluate(cfg, f"models:/{name}@candidate", ds.path, out_dir=tmp_path / "rep", promote=True,
                     cache_dir=tmp_path / "cache")  # fmt: skip
    assert not r.promoted and "champion" not in tracker.client.get_registered_model(name).aliases
    gates = {g.metric: g for g in r.gates}
    assert not gates["tstr_trtr_ratio"].passed and "test split has one class (left)" in gates["tstr_trtr_ratio"].reason
    assert not gates["class_fidelity"].passed and "one class" in gates["class_fidelity"].reason
    assert not gates["recall"].passed and r.metrics["recall"] < cfg.eval.gate_min_recall
    assert "tstr_trtr_ratio" not in r.metrics and "domain_val_accuracy" in r.not_measurable
    # Nothing unmeasured is shown as a number: no nan, and the reason is spelled out everywhere.
    summary, md = r.summary(), (r.report_dir / "report.md").read_text()
    saved = json.loads((r.report_dir / "metrics.json").read_text())
    for text in (summary, md, json.dumps(saved)):
        assert re.search(r"\bnan\b", text, re.IGNORECASE) is None
        assert "not measurable: there is no val split" in text
    assert "not measurable: the test split has one class (left)" in summary
    assert saved["metrics"]["tstr_trtr_ratio"].startswith("not measurable: the test split has one class")
    assert any("class fidelity (not measurable" in n for n in r.notes)
