"""medgan.tracking on a temporary SQLite store: run contents, lineage, registry, loading, serving, faults, no PHI."""

from __future__ import annotations

import http.server
import json
import os
import socket
import threading
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.entities import LoggedModelStatus
from mlflow.exceptions import MlflowException

from medgan.config import Config, to_dict
from medgan.dataset import SliceDataset, write_dataset
from medgan.models.generator import Generator, generate
from medgan.tracking import registry, store
from medgan.tracking.evaluation import log_evaluation
from medgan.tracking.null import NullTracker
from medgan.tracking.runs import Tracker

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


def started(cfg: Config, ds: SliceDataset, run_name: str, **kwargs) -> Tracker:
    """A Tracker as the CLI builds it, started as the training loop starts it."""
    tracker = Tracker(cfg.track, finish_wait_s=kwargs.pop("finish_wait_s", 30.0))
    tracker.start(cfg, ds, run_name, **kwargs)
    return tracker


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """One store, one training-like run (metrics, images, artifact, registration), shared by the tests below."""
    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root}/mlflow.db"
    ds = tiny_dataset(root / "data" / "tiny")
    cfg = tiny_config(uri)
    G = tiny_generator()
    tracker = started(cfg, ds, run_name="tiny-cpu-0001")
    for step, loss in [(64, 0.9), (128, 0.7)]:
        tracker.log_metrics({"loss/d": loss, "loss/g": 2 * loss, "d/prob_real": 0.6}, step=step)
        grid = np.full((128, 256), step, dtype=np.uint8)
        tracker.log_image(grid, "samples/glioma", step=step)
    (root / "health.json").write_text(json.dumps({"alarms": []}))
    tracker.log_artifact(root / "health.json", "reports")
    model_uri = tracker.register_generator(G, cfg, CLASSES, ds.content_hash, {"loss/g": 1.4}, step=128)
    tracker.finish()
    return dict(root=root, uri=uri, ds=ds, cfg=cfg, G=G, tracker=tracker, model_uri=model_uri, client=tracker.client)


def test_resolve_uri(tmp_path):
    assert store.resolve_uri("", tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert store.resolve_uri(None, tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert store.resolve_uri("sqlite:///runs/x.db", tmp_path) == f"sqlite:///{tmp_path.resolve()}/runs/x.db"
    assert store.resolve_uri("sqlite:////abs/x.db", tmp_path) == "sqlite:////abs/x.db"
    assert store.resolve_uri("store.db", tmp_path) == f"sqlite:///{tmp_path.resolve()}/store.db"
    assert store.resolve_uri("http://host:5000/", tmp_path) == "http://host:5000"


def test_run_params_and_status(tracked):
    run = tracked["client"].get_run(tracked["tracker"].run_id)
    p = run.data.params
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny-cpu-0001"
    assert p["model.d_reduce_channels"] == "16" and p["train.batch_size"] == "32"
    assert p["dataset.content_hash"] == tracked["ds"].content_hash
    assert p["dataset.classes"] == "glioma,notumor"
    assert p["medgan.version"] and p["torch.version"] == torch.__version__ and p["device"] == "cpu"
    assert p["track.tracking_uri"] == tracked["uri"] and p["track.resolved_uri"] == tracked["uri"]
    config = tracked["client"].download_artifacts(tracked["tracker"].run_id, "config.yaml", str(tracked["root"]))
    assert "d_reduce_channels: 16" in Path(config).read_text()
    exp = tracked["client"].get_experiment(run.info.experiment_id)
    assert exp.name == "medgan-tiny"
    assert exp.artifact_location.startswith((tracked["root"] / "mlartifacts").as_uri())
    assert tracked["tracker"].ui_command() == f"mlflow ui --backend-store-uri {tracked['uri']}"
    assert os.environ.get("MLFLOW_TRACKING_URI") != tracked["uri"]  # the library writes no environment


def test_metrics_have_steps(tracked):
    history = tracked["client"].get_metric_history(tracked["tracker"].run_id, "loss/d")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(64, 0.9), (128, 0.7)]


def test_experiment_runs_gives_params_and_histories(tracked):
    exp = tracked["client"].get_experiment(tracked["tracker"].experiment_id).name
    runs = store.experiment_runs(tracked["uri"], exp, ("loss/d", "loss/g"))
    (run,) = [r for r in runs if r["run_id"] == tracked["tracker"].run_id]
    assert run["run_name"] == "tiny-cpu-0001" and run["params"]["model.d_reduce_channels"] == "16"
    # (128, 1.4) is logged twice: once as a training metric, once linked to the registered model (as MLflow does)
    assert sorted(set(run["history"]["loss/g"])) == [(64, 1.8), (128, 1.4)]
    with pytest.raises(ValueError, match="no experiment 'nope'"):
        store.experiment_runs(tracked["uri"], "nope", ("loss/d",))


def test_images_logged_as_stepped_image_cards(tracked):
    files = [f.path for f in tracked["client"].list_artifacts(tracked["tracker"].run_id, "images")]
    steps = sorted({int(f.split("+step+")[1].split("+")[0]) for f in files if f.endswith(".png")})
    assert steps == [64, 128] and all("samples~glioma" in f for f in files)
    assert any(f.endswith("+compressed.webp") for f in files)  # the thumbnails the UI's image cards show
    assert tracked["client"].get_run(tracked["tracker"].run_id).data.tags["mlflow.loggedImages"] == "True"
    assert [f.path for f in tracked["client"].list_artifacts(tracked["tracker"].run_id, "reports")] == [
        "reports/health.json"
    ]


def test_lineage_digest_is_content_hash(tracked):
    run = tracked["client"].get_run(tracked["tracker"].run_id)
    (inp,) = run.inputs.dataset_inputs
    full = tracked["ds"].content_hash
    assert inp.dataset.digest == full[:32]
    assert json.loads(inp.dataset.profile)["content_hash"] == full
    source = json.loads(inp.dataset.source)
    assert source["manifest_hash"] == "f" * 64 and not Path(source["path"]).is_absolute()
    assert {t.key: t.value for t in inp.tags}["mlflow.data.context"] == "train"


def test_registration_alias_tags_and_package(tracked, tmp_path, monkeypatch):
    client = tracked["client"]
    assert tracked["model_uri"] == "models:/medgan-tiny/1" == tracked["tracker"].model_uri
    mv = client.get_model_version_by_alias("medgan-tiny", "candidate")
    assert str(mv.version) == "1"
    assert mv.tags["dataset_hash"] == tracked["ds"].content_hash and mv.tags["run_id"] == tracked["tracker"].run_id
    assert mv.tags["classes"] == "glioma,notumor" and mv.tags["resolution"] == "128"
    assert mv.tags["metric.loss/g"] == "1.4"
    # The LoggedModel is the run's output and carries the metrics it was registered with.
    logged = client.get_logged_model(registry.logged_model_id(mv))
    assert logged.source_run_id == tracked["tracker"].run_id and logged.status == LoggedModelStatus.READY
    assert {(m.key, m.value, m.step) for m in logged.metrics} == {("loss/g", 1.4, 128)}

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracked["uri"])
    info = mlflow.models.get_model_info("models:/medgan-tiny@candidate")
    sig = info.signature
    assert [c.name for c in sig.inputs.inputs] == ["label"]
    assert sig.outputs.inputs[0].shape == (-1, 1, 128, 128)
    assert [(p.name, p.default) for p in sig.params.params] == [("seed", 0)]
    # Models-from-code: the model is a Python file, nothing is cloudpickled; requirements pin what trained it.
    local = Path(mlflow.artifacts.download_artifacts("models:/medgan-tiny@candidate", dst_path=str(tmp_path)))
    conf = info.flavors["python_function"]
    assert conf["model_code_path"].endswith("model_code.py") and "python_model" not in conf
    assert not list(local.rglob("*.pkl")) and (local / "artifacts" / "code" / "medgan" / "models").is_dir()
    pins = (local / "requirements.txt").read_text().split()
    for want in (
        f"torch=={torch.__version__.split('+')[0]}",
        f"mlflow=={mlflow.__version__}",
        f"numpy=={np.__version__}",
    ):
        assert want in pins, pins


def test_load_by_alias_and_deterministic_predict(tracked, monkeypatch):
    expected = generate(tracked["G"], [0, 1, 1], [7, 8, 9])
    loaded = registry.load_generator("models:/medgan-tiny@candidate", tracked["uri"])
    assert loaded.classes == CLASSES and loaded.model_cfg.z_dim == 16
    assert loaded.info["version"] == "1" and loaded.info["run_id"] == tracked["tracker"].run_id
    assert loaded.info["dataset_hash"] == tracked["ds"].content_hash
    np.testing.assert_array_equal(generate(loaded.G, [0, 1, 1], [7, 8, 9]), expected)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracked["uri"])
    model = mlflow.pyfunc.load_model("models:/medgan-tiny@candidate")
    a = model.predict(pd.DataFrame({"label": ["glioma", "notumor", "notumor"]}), params={"seed": 7})
    b = model.predict(pd.DataFrame({"label": ["0", "1", "1"]}), params={"seed": 7})
    assert a.dtype == np.float32 and a.shape == (3, 1, 128, 128)
    np.testing.assert_array_equal(a, expected)
    np.testing.assert_array_equal(b, expected)


SHADOW = """
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model("models:/medgan-tiny@candidate")
model.predict(pd.DataFrame({"label": ["glioma"]}))
import medgan, medgan.tracking.registry  # a module the model does not ship
print(medgan.__file__)
"""


@pytest.mark.slow  # a fresh interpreter importing mlflow and torch
def test_loading_the_model_first_never_shadows_the_installed_medgan(tracked, tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracked["uri"], "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-c", SHADOW], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == str(root / "medgan" / "__init__.py")


def test_scoring_server_answers_every_input_format(tracked, monkeypatch):
    """What `mlflow models serve -m models:/NAME@ALIAS` runs, in process: CSV, inputs, instances, dataframe_*."""
    import uvicorn
    from mlflow.pyfunc import scoring_server

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracked["uri"])
    app = scoring_server.init(mlflow.pyfunc.load_model("models:/medgan-tiny@candidate"))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    names = json.dumps({"dataframe_split": {"columns": ["label"], "data": [["glioma"], ["notumor"]]}})
    requests = {
        "csv": ("text/csv", "label\nglioma\nnotumor\n", 0),
        "csv indices": ("text/csv", "label\n0\n1\n", 0),
        "inputs": ("application/json", {"inputs": {"label": ["glioma", "notumor"]}, "params": {"seed": 3}}, 3),
        "inputs list": ("application/json", {"inputs": ["glioma", "notumor"], "params": {"seed": 3}}, 3),
        "instances": ("application/json", {"instances": [{"label": "glioma"}, {"label": "notumor"}]}, 0),
        "dataframe_split": ("application/json", names, 0),
        "dataframe_records": ("application/json", {"dataframe_records": [{"label": 0}, {"label": 1}]}, 0),
    }
    try:
        for what, (content_type, body, seed) in requests.items():
            data = (body if isinstance(body, str) else json.dumps(body)).encode()
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/invocations", data=data, headers={"Content-Type": content_type}
            )
            with urllib.request.urlopen(req, timeout=30) as r:
                assert r.status == 200, what
                got = np.asarray(json.loads(r.read())["predictions"], dtype=np.float32)
            assert got.shape == (2, 1, 128, 128), what
            want = generate(tracked["G"], [0, 1], [seed, seed + 1]) if seed else generate(tracked["G"], [0, 1], [0, 1])
            np.testing.assert_allclose(got, want, atol=1e-6, err_msg=what)
    finally:
        server.should_exit = True
        thread.join(10)


def test_load_by_version_and_run(tracked):
    run_id = tracked["tracker"].run_id
    for ref in ("models:/medgan-tiny/1", f"runs:/{run_id}", run_id):
        loaded = registry.load_generator(ref, tracked["uri"])
        assert loaded.info["name"] == "medgan-tiny" and loaded.info["version"] == "1", ref


def test_load_checkpoint_folder_and_export(tracked, tmp_path):
    """One loader for local references too: a checkpoint, a run folder (newest checkpoint), an exported dataset."""
    G, cfg = tracked["G"], tracked["cfg"]
    run = tmp_path / "run"
    run.mkdir()
    for images in (64, 128):
        state = {"G_ema": G.state_dict(), "config": to_dict(cfg), "classes": CLASSES, "dataset_hash": "d" * 64,
                 "run_id": None, "geometry": {"spacing_mm": 0.9, "modality": "MR"}, "images_seen": images}  # fmt: skip
        torch.save(state, run / f"ckpt-{images:09d}.pt")
    loaded = registry.load_generator(str(run))
    assert loaded.info["checkpoint"] == str(run / "ckpt-000000128.pt") and loaded.info["spacing_mm"] == 0.9
    np.testing.assert_array_equal(generate(loaded.G, [1], [5]), generate(G, [1], [5]))
    assert not loaded.G.training and not any(p.requires_grad for p in loaded.G.parameters())

    export = tmp_path / "syn"
    export.mkdir()
    meta = {"synthetic": True, "generator": {"checkpoint": str(run / "ckpt-000000064.pt")}}
    (export / "dataset.json").write_text(json.dumps(meta))
    assert registry.load_generator(str(export)).info["checkpoint"].endswith("ckpt-000000064.pt")
    (export / "dataset.json").write_text(json.dumps({"synthetic": False}))
    with pytest.raises(ValueError, match="is a real dataset"):
        registry.load_generator(str(export))

    (run / "ckpt-000000192.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="not a readable medgan checkpoint"):
        registry.load_generator(str(run))
    with pytest.raises(FileNotFoundError, match="missing.pt not found"):
        registry.load_generator(str(tmp_path / "missing.pt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no ckpt"):
        registry.load_generator(str(tmp_path / "empty"))


def test_load_errors_list_what_exists(tracked):
    with pytest.raises(ValueError, match=r"registered models: \['medgan-tiny'\]"):
        registry.load_generator("models:/nope@candidate", tracked["uri"])
    with pytest.raises(ValueError, match="no alias .champ.; aliases: @candidate -> v1"):
        registry.load_generator("models:/medgan-tiny@champ", tracked["uri"])
    with pytest.raises(ValueError, match=r"no version 9; versions: \[1\]"):
        registry.load_generator("models:/medgan-tiny/9", tracked["uri"])
    with pytest.raises(ValueError, match="cannot load"):
        registry.load_generator("s3://bucket/model", tracked["uri"])


def test_evaluation_is_a_run_of_numeric_metrics_linked_to_the_model(tracked, tmp_path):
    from click.testing import CliRunner

    from medgan.cli import main

    (tmp_path / "report.json").write_text(json.dumps({"fd": 12.5}))
    loaded = registry.load_generator("models:/medgan-tiny@candidate", tracked["uri"])
    metrics = {"fd": 12.5, "tstr_trtr_ratio": 0.81, "gate_passed": True, "note": "text", "nan": float("nan")}
    eval_run = log_evaluation(tracked["uri"], loaded.info, metrics, tmp_path, tracked["ds"])
    client = tracked["client"]
    run = client.get_run(eval_run)
    assert run.data.metrics == {"fd": 12.5, "tstr_trtr_ratio": 0.81}
    assert run.data.tags["medgan.source_run_id"] == tracked["tracker"].run_id
    assert run.info.experiment_id == client.get_run(tracked["tracker"].run_id).info.experiment_id
    assert [f.path for f in client.list_artifacts(eval_run, "evaluation")] == ["evaluation/report.json"]
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.digest == tracked["ds"].content_hash[:32]
    assert {t.key: t.value for t in inp.tags}["mlflow.data.context"] == "evaluation"
    mv = client.get_model_version("medgan-tiny", "1")
    model_id = registry.logged_model_id(mv)
    assert [m.model_id for m in run.inputs.model_inputs] == [model_id]
    # The LoggedModel lists the evaluation's metrics (with the dataset they were measured on).
    on_model = {m.key: m for m in client.get_logged_model(model_id).metrics if m.run_id == eval_run}
    assert set(on_model) == {"fd", "tstr_trtr_ratio"} and on_model["fd"].dataset_digest == inp.dataset.digest
    # One pointer on the version, not a tag per metric.
    assert mv.tags["eval.run_id"] == eval_run and not [
        k for k in mv.tags if k.startswith("eval.") and k != "eval.run_id"
    ]

    registry.set_alias(tracked["uri"], "medgan-tiny", 1, "champion")
    assert str(client.get_model_version_by_alias("medgan-tiny", "champion").version) == "1"
    with pytest.raises(ValueError, match="no version 3"):
        registry.set_alias(tracked["uri"], "medgan-tiny", 3, "champion")
    listing = CliRunner().invoke(main, ["models", "list", "--tracking-uri", tracked["uri"]]).output
    assert "medgan-tiny: 1 version(s)" in listing and "@candidate -> v1" in listing and "@champion -> v1" in listing
    shown = CliRunner().invoke(main, ["models", "show", "medgan-tiny@champion", "--tracking-uri", tracked["uri"]])
    assert shown.exit_code == 0, shown.output
    out = shown.output
    assert "classes: glioma,notumor" in out and "evaluation: fd=12.5" in out and "training: loss/g=1.4" in out
    missing = CliRunner().invoke(main, ["models", "show", "nope", "--tracking-uri", tracked["uri"]])
    assert missing.exit_code == 1 and missing.output.count("\n") == 1 and "registered models" in missing.output


class _Down:
    """A store call that fails the way a locked or unreachable store does."""

    def __call__(self, *args, **kwargs):
        raise MlflowException("database is locked")


def test_an_outage_is_caught_up_as_soon_as_the_store_answers(tracked, monkeypatch):
    tracker = started(tracked["cfg"], tracked["ds"], run_name="tiny-cpu-0002")
    tracker.probe_interval_s = 0.0
    with monkeypatch.context() as down:
        down.setattr(tracker.client, "log_batch", _Down())
        down.setattr(tracker.client, "search_experiments", _Down())  # the store is down, not one request refused
        with pytest.warns(RuntimeWarning, match="log_metrics failed.*kept and logged as soon as"):
            tracker.log_metrics({"loss/d": 1.0}, step=1)
        tracker.log_metrics({"loss/d": 0.8}, step=2)  # still down: kept, no exception, no second warning
        assert tracker.missing() == ["2 x log_metrics (store unreachable)"]
    with pytest.warns(RuntimeWarning, match="answers again: the 2 call"):
        tracker.log_metrics({"loss/d": 0.5}, step=3)  # the first call after the outage logs what was kept
    history = tracker.client.get_metric_history(tracker.run_id, "loss/d")
    assert sorted((m.step, m.value) for m in history) == [(1, 1.0), (2, 0.8), (3, 0.5)]

    # A request the store refuses (the store itself answers) is not retried; the run ends saying what is missing.
    with pytest.warns(RuntimeWarning, match="register_generator failed.*2 classes"):
        assert tracker.register_generator(tracked["G"], tracked["cfg"], ["one class"], "h", {}) is None
    with pytest.warns(RuntimeWarning, match="ends without: register_generator"):
        tracker.finish("FINISHED")
    run = tracker.client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and "register_generator" in run.data.tags["medgan.tracking.missing"]


def test_a_registration_kept_through_an_outage_lands_at_finish(tracked, monkeypatch):
    tracker = started(tracked["cfg"], tracked["ds"], run_name="tiny-cpu-0005", finish_wait_s=5.0)
    tracker.probe_interval_s = 0.0
    with monkeypatch.context() as down:
        down.setattr(tracker.client, "create_logged_model", _Down())
        down.setattr(tracker.client, "search_experiments", _Down())
        with pytest.warns(RuntimeWarning, match="register_generator failed"):
            assert tracker.register_generator(tracked["G"], tracked["cfg"], CLASSES, "h", {"loss/g": 1.0}) is None
    with pytest.warns(RuntimeWarning, match="answers again"):
        tracker.finish()
    assert tracker.model_uri == "models:/medgan-tiny/2" and tracker.missing() == []
    run = tracker.client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["medgan.model_uri"] == "models:/medgan-tiny/2"
    tracker.client.delete_model_version("medgan-tiny", "2")  # the other tests see one version


def test_params_relogged_and_resumed_run(tracked):
    tracker = started(tracked["cfg"], tracked["ds"], run_name="tiny-cpu-0003")
    tracker.log_params({"train.batch_size": "32", "env.world_size": "1"})  # the loop re-logs the config: no conflict
    with pytest.warns(UserWarning, match=r"cannot change.*\['train.batch_size'\]"):
        tracker.log_params({"train.batch_size": "64", "env.rank": "0"})
    tracker.log_metrics({"loss/d": 1.0}, step=10)  # a rejected param does not pause tracking
    tracker.finish("KILLED")
    resumed = started(tracked["cfg"], tracked["ds"], "tiny-cpu-0003", resume_run_id=tracker.run_id)
    assert resumed.run_id == tracker.run_id
    resumed.log_metrics({"loss/d": 0.5}, step=20)
    resumed.finish()
    run = resumed.client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.params["train.batch_size"] == "32"
    assert run.data.params["env.rank"] == "0"
    assert [m.step for m in resumed.client.get_metric_history(tracker.run_id, "loss/d")] == [10, 20]


def test_null_tracker(tracked):
    t = NullTracker()
    t.start(tracked["cfg"], tracked["ds"], "x")
    t.log_params({"a": "1"})
    t.log_metrics({"loss/d": 1.0}, step=1)
    t.log_image(np.zeros((4, 4), np.uint8), "x", 1)
    assert t.register_generator(tracked["G"], tracked["cfg"], CLASSES, "h", {}) is None
    t.finish()
    assert t.run_id is None and t.model_uri is None and t.ui_command() == "" and t.missing() == []


def test_unreachable_server_fails_fast(tracked):
    cfg = tiny_config(f"http://127.0.0.1:{free_port()}")
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="unreachable.*--no-track"):
        started(cfg, tracked["ds"], run_name="never")
    assert time.monotonic() - start < 15


class _HealthOnly(http.server.BaseHTTPRequestHandler):
    """A server that answers /health but fails MLflow's API (a proxy to a dead backend, a wrong base path)."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        ok = self.path == "/health"
        self.send_response(200 if ok else 503)
        self.end_headers()
        self.wfile.write(b"OK" if ok else b"<html><body>\n<h1>503 backend unavailable</h1>\n</body></html>")

    do_POST = do_GET  # noqa: N815

    def log_message(self, *args):
        pass


def test_a_server_that_answers_health_but_fails_its_api_gives_one_line(tracked, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from medgan.cli import main

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HealthOnly)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        with pytest.raises(RuntimeError, match="answers /health but its API failed") as e:
            started(tiny_config(uri), tracked["ds"], run_name="never")
        assert "\n" not in str(e.value) and len(str(e.value)) < 600
        sets = ["model.width=8", "model.z_dim=16", "model.g_max_channels=32", "model.d_max_channels=32",
                "model.embed_dim=8", "train.device=cpu", "train.progress=false"]  # fmt: skip
        args = ["train", "--data", str(tracked["ds"].path), "--out", str(tmp_path), "--tracking-uri", uri]
        res = CliRunner().invoke(main, args + [a for s in sets for a in ("--set", s)])
        assert res.exit_code == 1 and res.output.count("\n") == 1, res.output
        assert res.output.startswith("medgan: error: MLflow tracking server") and "--no-track" in res.output
    finally:
        httpd.shutdown()


def test_no_phi_in_store(tracked):
    """The identifiers of the source data (header values, report paths) appear nowhere in the DB or artifacts."""
    root = tracked["root"]
    stored = [root / "mlflow.db", *(p for p in (root / "mlartifacts").rglob("*") if p.is_file())]
    assert len(stored) > 5
    assert (root / "data" / "tiny" / "report.csv").read_text().count("stc_test") == 1  # the input does hold them
    for path in stored:
        data = path.read_bytes()
        for needle in PHI + [p.encode() for p in PSEUDONYMS]:
            assert needle not in data, f"{needle!r} found in {path}"


def test_system_metrics_when_psutil_present(tracked, monkeypatch):
    pytest.importorskip("psutil")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    tracker = started(tracked["cfg"], tracked["ds"], run_name="tiny-cpu-0004")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(0.5)
        if any(k.startswith("system/") for k in tracker.client.get_run(tracker.run_id).data.metrics):
            break
    tracker.finish()
    keys = tracker.client.get_run(tracker.run_id).data.metrics
    assert "system/cpu_utilization_percentage" in keys and "system/system_memory_usage_megabytes" in keys


def _connect_and_make(uri_and_name: tuple[str, str]) -> str:
    uri, name = uri_and_name
    client = store.connect(uri)
    return client.create_experiment(name)


def test_processes_starting_together_on_a_new_sqlite_store_all_connect(tmp_path):
    # Two `medgan train` started at once on a new mlflow.db both run MLflow's schema migration; without the lock
    # beside the store the second fails with "Online migration expected to match one row".
    import multiprocessing

    uri = store.resolve_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        ids = pool.map(_connect_and_make, [(uri, f"exp-{i}") for i in range(3)])
    assert len(set(ids)) == 3
    assert {e.name for e in mlflow.MlflowClient(uri).search_experiments()} >= {"exp-0", "exp-1", "exp-2"}
