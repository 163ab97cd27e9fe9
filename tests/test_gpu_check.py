"""The GPU check, CPU-sized: ``benchmarks/gpu_check.sh --device cpu --quick`` runs every stage and writes every figure.

Run in CI so that a GPU slot never meets a typo: each stage must finish, and each figure must be a number, a flag, or an
explicit "not measurable: <reason>".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("env", "tests", "train_step", "ingest", "train", "ddp", "export")


def is_figure(v) -> bool:
    return isinstance(v, (bool, int, float)) or (isinstance(v, str) and v.startswith("not measurable: "))


@pytest.fixture(scope="module")
def check(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict]:
    tmp = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        env.pop(k, None)
    cmd = ["bash", "benchmarks/gpu_check.sh", "--device", "cpu", "--quick", "--results", str(tmp)]
    cmd += ["--work", str(tmp / "w")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    path = tmp / "cpu-quick.json"
    assert path.is_file(), proc.stdout + proc.stderr
    return proc, json.loads(path.read_text())["gpu_check"]


@pytest.mark.slow
def test_every_stage_runs_and_passes_on_cpu(check):
    proc, report = check
    assert report["order"] == list(STAGES) and sorted(report["stages"]) == sorted(STAGES)
    failed = {k: r.get("reason") for k, r in report["stages"].items() if r["status"] != "ok"}
    assert not failed, failed
    assert proc.returncode == 0 and "all stages ok" in proc.stdout
    for name in STAGES:  # the printed summary has one line per stage
        assert any(line.startswith(name) for line in proc.stdout.splitlines()), name


@pytest.mark.slow
def test_every_figure_is_a_number_or_says_why_not(check):
    _, report = check
    s = report["stages"]
    assert s["tests"]["passed"] >= 4 and s["tests"]["failed"] == 0  # the gpu tests ran on the CPU, not skipped
    for b in ("batch_4", "batch_8"):
        step = s["train_step"][b]
        assert step["medgan_img_per_s"] > 0 and step["baseline_img_per_s"] > 0 and step["ratio"] > 0
        assert is_figure(step["fraction_of_bf16_peak"])
    assert s["ingest"]["train_slices"] > 0 and len(s["ingest"]["classes"]) >= 2
    train = s["train"]
    for what in ("compile", "bf16", "channels_last"):
        assert isinstance(train[what]["took_effect"], bool), what
    assert train["compile"]["took_effect"] is False  # compile=auto: CUDA only
    assert train["channels_last"]["took_effect"] is True and train["img_per_s"] > 0
    assert is_figure(train["compile"]["first_step_compile_s"])
    assert s["ddp"]["process_group"] is True and "DDP 1 x gloo" in s["ddp"]["env"]
    export = s["export"]
    assert export["compared"].startswith("not measurable: ")
    # The same CPU export twice: equal up to rounding (one float16 step was seen), never a grey level apart.
    assert export["max_abs_diff_float16_slices"] <= 1e-3 and isinstance(export["same_device_identical"], bool)
    assert export["max_png8_grey_level_diff"] <= 1
    # No gaps: a figure that could not be taken says why instead of being null (env reports versions, null = absent).
    gaps = [f"{name}.{path}" for name, r in s.items() if name != "env" for path in nulls(r)]
    assert not gaps, gaps


def nulls(value, path: str = "") -> list[str]:
    if value is None:
        return [path]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in nulls(v, f"{path}.{k}" if path else k)]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in nulls(v, f"{path}[{i}]")]
    return []


def test_gpu_requirements_are_medgans_dependencies_without_torch():
    import tomllib

    def name(spec: str) -> str:
        return spec.split(";")[0].split("#")[0].strip().split(">")[0].split("=")[0].split("<")[0].strip().lower()

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {name(d) for d in project["dependencies"]} - {"torch"}
    wanted |= {name(d) for d in project["optional-dependencies"]["dev"] if name(d) == "pytest"}
    lines = (ROOT / "benchmarks" / "gpu_requirements.txt").read_text().splitlines()
    listed = {name(line) for line in lines if name(line)}
    assert "torch" not in listed, "the GPU machine's own torch must stay: do not list torch"
    assert listed == wanted, f"missing {sorted(wanted - listed)}, extra {sorted(listed - wanted)}"


def load_check():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_stage_past_its_box_is_killed_and_a_failing_one_says_why(tmp_path):
    import argparse

    gpu_check = load_check()
    args = argparse.Namespace(device="cpu", quick=True)
    t0 = time.monotonic()
    late = gpu_check.run_stage("ingest", 1.0, args, tmp_path, [])  # a Python start alone takes longer
    assert late["status"] == "timed out" and "ran past its 1 s box" in late["reason"]
    assert time.monotonic() - t0 < 15  # killed, not waited for
    assert not (tmp_path / "datasets" / "sample").exists()
    failed = gpu_check.run_stage("export", 60.0, args, tmp_path, [])  # nothing trained in this scratch folder
    assert failed["status"] == "failed" and "no checkpoint to export" in failed["reason"]
