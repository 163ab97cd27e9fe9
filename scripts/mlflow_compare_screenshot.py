"""Screenshot of the MLflow UI's compare view for two short trainings that differ in ``model.d_reduce_channels``.

Starts a local ``mlflow server`` (SQLite backend, proxied artifacts) unless ``--tracking-uri`` names one, runs
``medgan train`` once per ``--reduce`` value into one experiment, opens the compare view of those runs (params side by
side) and their loss curves in headless Chromium (Debian: ``apt-get install chromium``) and writes two PNGs.

Example:
    python scripts/mlflow_compare_screenshot.py --data datasets/demo --config configs/train/cpu_smoke.yaml \\
        --out docs/mlflow_compare.png
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

from medgan.tracking.store import wait_for_server

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(uri: str, path: str, body: dict | None = None) -> dict:
    """One MLflow REST call (GET without a body, POST with one)."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    req = urllib.request.Request(f"{uri}/api/2.0/mlflow/{path}", data=data, headers=headers)
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def compare_url(uri: str, experiment: str, n: int) -> tuple[str, list[str], str]:
    """The compare-runs URL of the `n` newest finished runs of `experiment`."""
    exp = api(uri, "experiments/get-by-name?" + urllib.parse.urlencode({"experiment_name": experiment}))["experiment"]
    body = {
        "experiment_ids": [exp["experiment_id"]],
        "filter": "attributes.status = 'FINISHED'",
        "order_by": ["attributes.start_time DESC"],
        "max_results": n,
    }
    runs = api(uri, "runs/search", body).get("runs", [])
    if len(runs) < 2:
        raise SystemExit(f"experiment {experiment!r} has {len(runs)} finished run(s); the compare view needs 2")
    ids = [r["info"]["run_id"] for r in runs]
    query = urllib.parse.urlencode({"runs": json.dumps(ids), "experiments": json.dumps([exp["experiment_id"]])})
    return f"{uri}/#/compare-runs?{query}", ids, exp["experiment_id"]


def metric_url(uri: str, ids: list[str], experiment_id: str, keys: list[str]) -> str:
    """The UI's metric page: one curve per run and metric against step (images seen)."""
    q = f"?runs={json.dumps(ids)}&metric={json.dumps(keys[0])}&experiments={json.dumps([experiment_id])}"
    q += f"&plot_metric_keys={json.dumps(keys)}&plot_layout={{}}&x_axis=step&y_axis_scale=linear&line_smoothness=1"
    q += "&show_point=false&deselected_curves=[]&last_linear_y_axis_range=[]"
    return f"{uri}/#/metric/{urllib.parse.quote(q, safe='?&=')}"


def screenshot(url: str, out: Path, size: str, wait_ms: int) -> None:
    browser = next((b for b in map(shutil.which, BROWSERS) if b), None)
    if browser is None:
        raise SystemExit("no Chromium found: install it (Debian: apt-get install -y chromium), rerun with --skip-train")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        cmd = [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run"]
        cmd += [f"--user-data-dir={profile}", f"--window-size={size}", f"--virtual-time-budget={wait_ms}"]
        subprocess.run([*cmd, f"--screenshot={out.resolve()}", url], check=True, capture_output=True, timeout=180)
    if not out.is_file() or out.stat().st_size < 10_000:
        raise SystemExit(f"Chromium wrote no usable screenshot at {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, help="slice dataset to train on (not needed with --skip-train)")
    ap.add_argument("--out", type=Path, default=Path("docs/mlflow_compare.png"))
    ap.add_argument("--tracking-uri", default="", help="an existing mlflow server; default: start one in --store")
    ap.add_argument("--store", type=Path, default=Path(".mlflow-compare"), help="backend + artifacts of the server")
    ap.add_argument("--experiment", default="medgan-d-reduce-compare")
    ap.add_argument("--reduce", default="16,none", help="model.d_reduce_channels values, one training each")
    ap.add_argument("--config", action="append", default=[], help="YAML overlay(s) for medgan train")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="KEY=VALUE for medgan train")
    ap.add_argument("--skip-train", action="store_true", help="screenshot the newest runs already in the experiment")
    ap.add_argument("--metrics", default="loss/d,loss/g", help="curves for the second shot (<out>-curves.png)")
    ap.add_argument("--size", default="1600,1300", help="browser window WIDTH,HEIGHT")
    ap.add_argument("--wait-ms", type=int, default=20000, help="virtual time for the UI to load before the shot")
    args = ap.parse_args()

    proc, uri = None, args.tracking_uri.rstrip("/")
    if not uri:
        args.store.mkdir(parents=True, exist_ok=True)
        store = args.store.resolve()
        uri = f"http://127.0.0.1:{free_port()}"
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", uri.rsplit(":", 1)[1]]
        cmd += ["--workers", "1", "--backend-store-uri", f"sqlite:///{store}/mlflow.db"]
        cmd += ["--artifacts-destination", str(store / "artifacts")]
        proc = subprocess.Popen(cmd, stdout=open(store / "server.log", "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115
    try:
        error = wait_for_server(uri, 60.0, proc)
        if error:
            raise SystemExit(f"mlflow server at {uri} is not healthy: {error}")
        values = [v.strip() for v in args.reduce.split(",") if v.strip()]
        if not args.skip_train:
            if args.data is None:
                raise SystemExit("--data is required unless --skip-train")
            for value in values:
                cmd = [sys.executable, "-m", "medgan", "train", "--data", str(args.data), "--tracking-uri", uri]
                cmd += ["--out", str(args.store / "runs")]
                cmd += [x for c in args.config for x in ("--config", c)]
                sets = [*args.sets, f"model.d_reduce_channels={value}", f"track.experiment={args.experiment}"]
                cmd += [x for s in sets for x in ("--set", s)]
                print("+", " ".join(cmd), flush=True)
                subprocess.run(cmd, check=True)
        url, ids, experiment_id = compare_url(uri, args.experiment, len(values))
        print(f"compare view of runs {ids}: {url}")
        screenshot(url, args.out, args.size, args.wait_ms)
        curves = args.out.with_name(f"{args.out.stem}-curves{args.out.suffix}")
        keys = [k.strip() for k in args.metrics.split(",") if k.strip()]
        screenshot(metric_url(uri, ids, experiment_id, keys), curves, args.size, args.wait_ms)
        print(f"wrote {args.out} and {curves}")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=15)


if __name__ == "__main__":
    main()
