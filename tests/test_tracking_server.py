"""Team mode: a real `mlflow server` (SQLite backend, proxied artifacts) -> run -> register -> load over HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_tracking import CLASSES, free_port, tiny_config, tiny_dataset, tiny_generator

from medgan import tracking
from medgan.models.generator import generate

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


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    cmd += ["--backend-store-uri", f"sqlite:///{root}/db.sqlite", "--artifacts-destination", str(root / "art")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    log = open(root / "server.log", "wb")  # noqa: SIM115 (closed in teardown)
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    if tracking.wait_for_server(uri, 45.0, proc) is not None:
        proc.kill()
        pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
    yield dict(uri=uri, root=root)
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def test_register_and_load_over_http(server, tmp_path):
    uri = server["uri"]
    ds = tiny_dataset(tmp_path / "tiny")
    cfg = tiny_config(uri)
    G = tiny_generator()
    tracker = tracking.make_tracker(cfg, ds, run_name="tiny-server-0001")
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
    assert any((server["root"] / "art").rglob("generator.pt"))

    loaded = tracking.load_generator("models:/medgan-tiny@candidate", uri)
    expected = generate(G, [1, 0], [11, 12])
    np.testing.assert_array_equal(generate(loaded.G, [1, 0], [11, 12]), expected)
    assert loaded.info["run_id"] == tracker.run_id and loaded.info["version"] == "1"

    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": ""}
    out = subprocess.run([sys.executable, "-c", NO_MEDGAN], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["shape"] == [2, 1, 128, 128] and got["dtype"] == "float32"
    assert got["sum"] == pytest.approx(float(expected.astype(np.float64).sum()), abs=1e-3)

    assert "medgan-tiny: 1 version(s), @candidate -> v1" in tracking.describe_models(uri)


def test_no_phi_on_server(server):
    for path in [*Path(server["root"]).rglob("*")]:
        if path.is_file() and path.name != "server.log":
            data = path.read_bytes()
            assert b"stc_test" not in data and b"crlab" not in data, path
