"""Team mode: a real `mlflow server` (SQLite backend, proxied artifacts) -> run -> register -> load over HTTP; and the
server stopped mid-run and started again: tracking catches up as soon as it answers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_tracking import CLASSES, free_port, started, tiny_config, tiny_dataset, tiny_generator

from medgan.models.generator import generate
from medgan.tracking import registry
from medgan.tracking.store import wait_for_server

pytestmark = pytest.mark.slow

# Loads the registered model in a fresh interpreter where medgan cannot be imported from the checkout or site-packages:
# the pyfunc model must bring its own code.
NO_MEDGAN = """
import importlib.util, json, sys
sys.path = [p for p in sys.path if "__editable__" not in p and p not in ("", ".")]
sys.path_hooks[:] = [h for h in sys.path_hooks if "__editable__" not in getattr(h, "__module__", "")]
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
sys.path_importer_cache.clear()
assert importlib.util.find_spec("medgan") is None, "medgan is importable"
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model("models:/medgan-tiny@candidate")
out = model.predict(pd.DataFrame({"label": ["notumor", "glioma"]}), params={"seed": 11})
json.dump({"shape": list(out.shape), "dtype": str(out.dtype), "sum": float(out.astype("float64").sum())}, sys.stdout)
"""


class Server:
    """One `mlflow server` on 127.0.0.1 (SQLite backend, proxied artifacts) that a test can stop and start again."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = open(root / "server.log", "ab")  # noqa: SIM115 (closed by close())

    def start(self) -> None:
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--workers", "1", "--backend-store-uri", f"sqlite:///{self.root}/db.sqlite"]
        cmd += ["--artifacts-destination", str(self.root / "art")]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        self.proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        if wait_for_server(self.uri, 150.0, self.proc) is not None:
            self.stop()
            pytest.fail(f"mlflow server did not start: {(self.root / 'server.log').read_text()[-2000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()
        self.log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("server"))
    srv.start()
    yield srv
    srv.close()


def test_register_and_load_over_http(server, tmp_path):
    uri = server.uri
    ds = tiny_dataset(tmp_path / "tiny")
    cfg = tiny_config(uri)
    G = tiny_generator()
    tracker = started(cfg, ds, run_name="tiny-server-0001")
    tracker.log_metrics({"loss/d": 0.8}, step=32)
    tracker.log_image(np.zeros((16, 32), np.uint8), "samples/glioma", step=32)
    model_uri = tracker.register_generator(G, cfg, CLASSES, ds.content_hash, {"loss/g": 1.1})
    tracker.finish()
    assert model_uri == "models:/medgan-tiny/1"
    assert tracker.ui_command().startswith(f"open {uri}/#/experiments/")

    run = tracker.client.get_run(tracker.run_id)
    assert run.data.params["dataset.content_hash"] == ds.content_hash
    assert run.inputs.dataset_inputs[0].dataset.digest == ds.content_hash[:32]
    assert [m.step for m in tracker.client.get_metric_history(tracker.run_id, "loss/d")] == [32]
    # Artifacts went through the server's proxy into its --artifacts-destination.
    assert any((server.root / "art").rglob("generator.pt"))

    loaded = registry.load_generator("models:/medgan-tiny@candidate", uri)
    expected = generate(G, [1, 0], [11, 12])
    np.testing.assert_array_equal(generate(loaded.G, [1, 0], [11, 12]), expected)
    assert loaded.info["run_id"] == tracker.run_id and loaded.info["version"] == "1"

    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": ""}
    out = subprocess.run([sys.executable, "-c", NO_MEDGAN], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["shape"] == [2, 1, 128, 128] and got["dtype"] == "float32"
    assert got["sum"] == pytest.approx(float(expected.astype(np.float64).sum()), abs=1e-3)

    (summary,) = registry.registered_models(uri)
    assert (summary.name, summary.n_versions, summary.aliases) == ("medgan-tiny", 1, {"candidate": "1"})


def test_server_outage_mid_run_is_caught_up_when_it_returns(server, tmp_path, monkeypatch):
    """The server goes away mid-run and comes back: nothing is lost, and the generator is registered at the end."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # what the CLI sets short (MLflow's default: minutes)
    ds = tiny_dataset(tmp_path / "tiny")
    cfg = tiny_config(server.uri)
    tracker = started(cfg, ds, run_name="tiny-server-0002", finish_wait_s=0.0)
    late = started(cfg, ds, run_name="tiny-server-0003", finish_wait_s=0.0)
    tracker.probe_interval_s = 0.0
    tracker.log_metrics({"loss/d": 0.9}, step=32)
    server.stop()
    try:
        with pytest.warns(RuntimeWarning, match="log_metrics failed.*kept and logged as soon as"):
            tracker.log_metrics({"loss/d": 0.7}, step=64)
        tracker.log_image(np.zeros((16, 32), np.uint8), "samples/glioma", step=64)
        assert tracker.register_generator(tiny_generator(), cfg, CLASSES, ds.content_hash, {"loss/g": 1.0}) is None
        kept = ["1 x log_metrics (store unreachable)", "1 x log_image (store unreachable)"]
        assert tracker.missing() == [*kept, "1 x register_generator (store unreachable)"]
        # Still down at the end: the run says what it lacks, and stays RUNNING rather than claiming FINISHED.
        with pytest.warns(RuntimeWarning, match="log_metrics failed"):
            late.log_metrics({"loss/d": 0.4}, step=32)
        with pytest.warns(RuntimeWarning, match=r"did not answer by the end.*1 x log_metrics.*stays RUNNING"):
            late.finish()
    finally:
        server.start()
    with pytest.warns(RuntimeWarning, match="answers again: the 3 call"):
        tracker.log_metrics({"loss/d": 0.5}, step=96)  # the first call after the server is back
    tracker.finish()
    assert tracker.model_uri == "models:/medgan-tiny/2" and tracker.missing() == []
    run = tracker.client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and "medgan.tracking.missing" not in run.data.tags
    history = tracker.client.get_metric_history(tracker.run_id, "loss/d")
    assert sorted(m.step for m in history) == [32, 64, 96]
    images = [f.path for f in tracker.client.list_artifacts(tracker.run_id, "images")]
    assert any(f.startswith("images/samples~glioma+step+64") for f in images)
    assert late.client.get_run(late.run_id).info.status == "RUNNING"


def test_no_phi_on_server(server):
    for path in [*Path(server.root).rglob("*")]:
        if path.is_file() and path.name != "server.log":
            data = path.read_bytes()
            assert b"stc_test" not in data and b"crlab" not in data, path
