"""medgan.tracking against a temporary SQLite store: run contents, lineage, registry, loading, failures, no PHI."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from medgan import tracking
from medgan.config import Config
from medgan.dataset import SliceDataset, write_dataset
from medgan.models.generator import Generator, generate

CLASSES = ["glioma", "notumor"]
# What a DICOM header of the volunteer data holds; none of it may reach the tracking store.
PHI = [b"stc_test", b"crlab", b"19550317"]
PSEUDONYMS = ["p-7c1e90ab", "p-2b44d013"]


def tiny_config(uri: str) -> Config:
    cfg = Config()
    cfg.model.z_dim, cfg.model.width, cfg.model.g_max_channels, cfg.model.embed_dim = 16, 8, 32, 8
    cfg.model.d_reduce_channels = 16
    cfg.track.tracking_uri = uri
    return cfg


def tiny_generator() -> Generator:
    torch.manual_seed(0)
    return Generator(num_classes=2, z_dim=16, width=8, max_channels=32, embed_dim=8).eval()


def tiny_dataset(out: Path) -> SliceDataset:
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (6, 1, 128, 128)).astype(np.float32)
    rows = [
        dict(split="train", label=i % 2, patient=PSEUDONYMS[i % 2], volume=f"v-{i % 2}", slice_index=i,
             position_mm=float(i), spacing_mm=1.0, modality="MR", seed="")
        for i in range(6)
    ]  # fmt: skip
    # The ingest report names sources relative to the data root; folder names can carry identifiers.
    report = [dict(manifest_row=0, source="stc_test/crlab/IM0001.dcm", status="ok", reason="", n_slices=6)]
    write_dataset(out, images, rows, CLASSES, meta={"source_manifest_hash": "f" * 64}, report=report)
    return SliceDataset.open(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One store, one training-like run (metrics, images, artifact, registration), shared by the tests below."""
    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root}/mlflow.db"
    ds = tiny_dataset(root / "data" / "tiny")
    cfg = tiny_config(uri)
    G = tiny_generator()
    tracker = tracking.make_tracker(cfg, ds, run_name="tiny-cpu-0001")
    assert isinstance(tracker, tracking.Tracker)
    for step, loss in [(64, 0.9), (128, 0.7)]:
        tracker.log_metrics({"loss/d": loss, "loss/g": 2 * loss, "d/prob_real": 0.6}, step=step)
        grid = np.full((128, 256), step, dtype=np.uint8)
        tracker.log_image(grid, "samples/glioma", step=step)
    (root / "health.json").write_text(json.dumps({"alarms": []}))
    tracker.log_artifact(root / "health.json", "reports")
    model_uri = tracker.register_generator(G, cfg, CLASSES, ds.content_hash, {"loss/g": 1.4})
    tracker.finish()
    return dict(root=root, uri=uri, ds=ds, cfg=cfg, G=G, tracker=tracker, model_uri=model_uri, client=tracker.client)


def test_resolve_uri(tmp_path):
    assert tracking.resolve_uri("", tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert tracking.resolve_uri(None, tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert tracking.resolve_uri("sqlite:///runs/x.db", tmp_path) == f"sqlite:///{tmp_path.resolve()}/runs/x.db"
    assert tracking.resolve_uri("sqlite:////abs/x.db", tmp_path) == "sqlite:////abs/x.db"
    assert tracking.resolve_uri("store.db", tmp_path) == f"sqlite:///{tmp_path.resolve()}/store.db"
    assert tracking.resolve_uri("http://host:5000/", tmp_path) == "http://host:5000"


def test_run_params_and_status(store):
    run = store["client"].get_run(store["tracker"].run_id)
    p = run.data.params
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny-cpu-0001"
    assert p["model.d_reduce_channels"] == "16" and p["train.batch_size"] == "32"
    assert p["dataset.content_hash"] == store["ds"].content_hash
    assert p["dataset.classes"] == "glioma,notumor"
    assert p["medgan.version"] and p["torch.version"] == torch.__version__ and p["device"] == "cpu"
    assert p["track.tracking_uri"] == store["uri"] and p["track.resolved_uri"] == store["uri"]
    config = store["client"].download_artifacts(store["tracker"].run_id, "config.yaml", str(store["root"]))
    assert "d_reduce_channels: 16" in Path(config).read_text()
    exp = store["client"].get_experiment(run.info.experiment_id)
    assert exp.name == "medgan-tiny"
    assert exp.artifact_location.startswith((store["root"] / "mlartifacts").as_uri())
    assert store["tracker"].ui_command() == f"mlflow ui --backend-store-uri {store['uri']}"


def test_metrics_have_steps(store):
    history = store["client"].get_metric_history(store["tracker"].run_id, "loss/d")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(64, 0.9), (128, 0.7)]


def test_experiment_runs_gives_params_and_histories(store):
    exp = store["client"].get_experiment(store["tracker"].experiment_id).name
    runs = tracking.experiment_runs(store["uri"], exp, ("loss/d", "loss/g"))
    (run,) = [r for r in runs if r["run_id"] == store["tracker"].run_id]
    assert run["run_name"] == "tiny-cpu-0001" and run["params"]["model.d_reduce_channels"] == "16"
    assert sorted(run["history"]["loss/g"]) == [(64, 1.8), (128, 1.4)]
    with pytest.raises(ValueError, match="no experiment 'nope'"):
        tracking.experiment_runs(store["uri"], "nope", ("loss/d",))


def test_images_logged_with_steps(store):
    files = [f.path for f in store["client"].list_artifacts(store["tracker"].run_id, "images")]
    steps = sorted({int(f.split("+step+")[1].split("+")[0]) for f in files if f.endswith(".png")})
    assert steps == [64, 128] and all("samples~glioma" in f for f in files)
    assert [f.path for f in store["client"].list_artifacts(store["tracker"].run_id, "reports")] == [
        "reports/health.json"
    ]


def test_lineage_digest_is_content_hash(store):
    run = store["client"].get_run(store["tracker"].run_id)
    (inp,) = run.inputs.dataset_inputs
    full = store["ds"].content_hash
    assert inp.dataset.digest == full[:32]
    assert json.loads(inp.dataset.profile)["content_hash"] == full
    source = json.loads(inp.dataset.source)
    assert source["manifest_hash"] == "f" * 64 and not Path(source["path"]).is_absolute()
    assert {t.key: t.value for t in inp.tags}["mlflow.data.context"] == "train"


def test_registration_alias_and_tags(store):
    client = store["client"]
    assert store["model_uri"] == "models:/medgan-tiny/1"
    mv = client.get_model_version_by_alias("medgan-tiny", "candidate")
    assert mv.version == "1" or int(mv.version) == 1
    assert mv.tags["dataset_hash"] == store["ds"].content_hash and mv.tags["run_id"] == store["tracker"].run_id
    assert mv.tags["classes"] == "glioma,notumor" and mv.tags["resolution"] == "128"
    assert mv.tags["metric.loss/g"] == "1.4"
    with tracking._using(store["uri"]):
        info = tracking.mlflow.models.get_model_info("models:/medgan-tiny@candidate")
    sig = info.signature
    assert [c.name for c in sig.inputs.inputs] == ["label"]
    assert sig.outputs.inputs[0].shape == (-1, 1, 128, 128)
    assert [(p.name, p.default) for p in sig.params.params] == [("seed", 0)]


def test_load_by_alias_and_deterministic_predict(store):
    expected = generate(store["G"], [0, 1, 1], [7, 8, 9])
    loaded = tracking.load_generator("models:/medgan-tiny@candidate", store["uri"])
    assert loaded.classes == CLASSES and loaded.model_cfg.z_dim == 16
    assert loaded.info["version"] == "1" and loaded.info["run_id"] == store["tracker"].run_id
    assert loaded.info["dataset_hash"] == store["ds"].content_hash
    np.testing.assert_array_equal(generate(loaded.G, [0, 1, 1], [7, 8, 9]), expected)
    with tracking._using(store["uri"]):
        model = tracking.mlflow.pyfunc.load_model("models:/medgan-tiny@candidate")
    a = model.predict(pd.DataFrame({"label": ["glioma", "notumor", "notumor"]}), params={"seed": 7})
    b = model.predict(pd.DataFrame({"label": [0, 1, 1]}), params={"seed": 7})
    assert a.dtype == np.float32 and a.shape == (3, 1, 128, 128)
    np.testing.assert_array_equal(a, expected)
    np.testing.assert_array_equal(b, expected)


def test_load_by_version_and_run(store):
    run_id = store["tracker"].run_id
    for ref in ("models:/medgan-tiny/1", f"runs:/{run_id}", run_id):
        loaded = tracking.load_generator(ref, store["uri"])
        assert loaded.info["name"] == "medgan-tiny" and loaded.info["version"] == "1", ref


def test_load_checkpoint_path_delegates(store, tmp_path, monkeypatch):
    from medgan.train import checkpoint

    ckpt = tmp_path / "ckpt-000064.pt"
    ckpt.write_bytes(b"")
    monkeypatch.setattr(checkpoint, "load_generator", lambda path: ("loaded", path))
    assert tracking.load_generator(str(ckpt)) == ("loaded", ckpt)
    with pytest.raises(FileNotFoundError, match="missing.pt not found"):
        tracking.load_generator(str(tmp_path / "missing.pt"))


def test_load_errors_list_what_exists(store):
    with pytest.raises(ValueError, match=r"registered models: \['medgan-tiny'\]"):
        tracking.load_generator("models:/nope@candidate", store["uri"])
    with pytest.raises(ValueError, match="no alias .champ.; aliases: @candidate -> v1"):
        tracking.load_generator("models:/medgan-tiny@champ", store["uri"])
    with pytest.raises(ValueError, match=r"no version 9; versions: \[1\]"):
        tracking.load_generator("models:/medgan-tiny/9", store["uri"])
    with pytest.raises(ValueError, match="cannot load"):
        tracking.load_generator("s3://bucket/model", store["uri"])


def test_evaluation_alias_and_describe(store, tmp_path):
    (tmp_path / "report.json").write_text(json.dumps({"fd": 12.5}))
    loaded = tracking.load_generator("models:/medgan-tiny@candidate", store["uri"])
    eval_run = tracking.log_evaluation(store["uri"], loaded.info, {"fd": 12.5, "tstr_ratio": 0.81}, tmp_path)
    client = store["client"]
    run = client.get_run(eval_run)
    assert run.data.metrics == {"fd": 12.5, "tstr_ratio": 0.81}
    assert run.data.tags["medgan.source_run_id"] == store["tracker"].run_id
    assert run.info.experiment_id == client.get_run(store["tracker"].run_id).info.experiment_id
    assert [f.path for f in client.list_artifacts(eval_run, "evaluation")] == ["evaluation/report.json"]
    tags = client.get_model_version("medgan-tiny", "1").tags
    assert tags["eval.fd"] == "12.5" and tags["eval.run_id"] == eval_run

    tracking.set_alias(store["uri"], "medgan-tiny", 1, "champion")
    assert client.get_model_version_by_alias("medgan-tiny", "champion").version in ("1", 1)
    with pytest.raises(ValueError, match="no version 3"):
        tracking.set_alias(store["uri"], "medgan-tiny", 3, "champion")
    listing = tracking.describe_models(store["uri"])
    assert "medgan-tiny: 1 version(s)" in listing and "@candidate -> v1" in listing and "@champion -> v1" in listing
    shown = tracking.describe_model(store["uri"], "medgan-tiny@champion")
    assert "classes: glioma,notumor" in shown and "evaluation: fd=12.5" in shown and "training: loss/g=1.4" in shown


def test_tracking_failure_mid_run_warns_and_retries(store, monkeypatch):
    tracker = tracking.make_tracker(store["cfg"], store["ds"], run_name="tiny-cpu-0002")
    tracker.retry_interval_s = 0.0
    real = tracker.client.log_batch

    def down(*args, **kwargs):
        raise tracking.MlflowException("database is locked")

    monkeypatch.setattr(tracker.client, "log_batch", down)
    with pytest.warns(RuntimeWarning, match="log_metrics failed.*Training continues"):
        tracker.log_metrics({"loss/d": 1.0}, step=1)
    tracker.log_metrics({"loss/d": 1.0}, step=2)  # still down: no exception, no second warning
    monkeypatch.setattr(tracker.client, "log_batch", real)
    tracker.log_metrics({"loss/d": 0.5}, step=3)  # retried once the store answers again
    with pytest.warns(RuntimeWarning, match="register_generator failed.*2 classes"):  # a new outage warns again
        assert tracker.register_generator(store["G"], store["cfg"], ["one class"], "h", {}) is None
    tracker.finish("FAILED")
    history = tracker.client.get_metric_history(tracker.run_id, "loss/d")
    assert [(m.step, m.value) for m in history] == [(3, 0.5)]
    assert tracker.client.get_run(tracker.run_id).info.status == "FAILED"


def test_params_relogged_and_resumed_run(store):
    tracker = tracking.make_tracker(store["cfg"], store["ds"], run_name="tiny-cpu-0003")
    tracker.log_params({"train.batch_size": "32", "env.world_size": "1"})  # the loop re-logs the config: no conflict
    with pytest.warns(UserWarning, match=r"cannot change.*\['train.batch_size'\]"):
        tracker.log_params({"train.batch_size": "64", "env.rank": "0"})
    tracker.log_metrics({"loss/d": 1.0}, step=10)  # a rejected param does not pause tracking
    tracker.finish("KILLED")
    resumed = tracking.make_tracker(store["cfg"], store["ds"], "tiny-cpu-0003", resume_run_id=tracker.run_id)
    assert resumed.run_id == tracker.run_id
    resumed.log_metrics({"loss/d": 0.5}, step=20)
    resumed.finish()
    run = resumed.client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.params["train.batch_size"] == "32"
    assert run.data.params["env.rank"] == "0"
    assert [m.step for m in resumed.client.get_metric_history(tracker.run_id, "loss/d")] == [10, 20]


def test_null_tracker_when_disabled_or_not_rank0(store):
    cfg = tiny_config(store["uri"])
    assert isinstance(tracking.make_tracker(cfg, store["ds"], "x", rank=1), tracking.NullTracker)
    cfg.track.enabled = False
    t = tracking.make_tracker(cfg, store["ds"], "x")
    assert isinstance(t, tracking.NullTracker) and t.run_id is None
    t.log_params({"a": "1"})
    t.log_metrics({"loss/d": 1.0}, step=1)
    t.log_image(np.zeros((4, 4), np.uint8), "x", 1)
    assert t.register_generator(store["G"], cfg, CLASSES, "h", {}) is None
    t.finish()
    assert t.ui_command() == ""


def test_unreachable_server_fails_fast(store):
    cfg = tiny_config(f"http://127.0.0.1:{free_port()}")
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="unreachable.*--no-track"):
        tracking.make_tracker(cfg, store["ds"], run_name="never")
    assert time.monotonic() - start < 15


def test_no_phi_in_store(store):
    """The identifiers of the source data (header values, report paths) appear nowhere in the DB or artifacts."""
    root = store["root"]
    stored = [root / "mlflow.db", *(p for p in (root / "mlartifacts").rglob("*") if p.is_file())]
    assert len(stored) > 5
    assert (root / "data" / "tiny" / "report.csv").read_text().count("stc_test") == 1  # the input does hold them
    for path in stored:
        data = path.read_bytes()
        for needle in PHI + [p.encode() for p in PSEUDONYMS]:
            assert needle not in data, f"{needle!r} found in {path}"


def test_system_metrics_when_psutil_present(store, monkeypatch):
    pytest.importorskip("psutil")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    tracker = tracking.make_tracker(store["cfg"], store["ds"], run_name="tiny-cpu-0004")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(0.5)
        if any(k.startswith("system/") for k in tracker.client.get_run(tracker.run_id).data.metrics):
            break
    tracker.finish()
    keys = tracker.client.get_run(tracker.run_id).data.metrics
    assert "system/cpu_utilization_percentage" in keys and "system/system_memory_usage_megabytes" in keys
