"""Every CUDA path of medgan run and measured in one command, in at most 9 minutes on one GPU, with no network.

Stages, each in its own process under its own time box (a stage that fails or runs over is recorded and the next one
runs): ``env`` (torch, CUDA, cuDNN and NCCL as the machine has them), ``tests`` (the suite's gpu-marked tests),
``train_step`` (`train_step.py` at batch 64 and 512 against the plain loop: img/s, ratio, fraction of the bf16 peak),
``ingest`` (the bundled sample in ``data/sample``), ``train`` (configs/train/gpu.yaml for ~2 minutes, compile on:
whether compile, bf16 and channels_last took effect, img/s, first-step compile time), ``ddp`` (``torchrun
--nproc_per_node 1`` through the same loop: NCCL on CUDA, gloo on CPU) and ``export`` (the same export on the device
and on the CPU: the largest pixel difference). Every figure lands in ``benchmarks/results/<device>.json`` under
``"gpu_check"`` (``<device>-quick.json`` with ``--quick``) and a short summary is printed.

Usage:
    bash benchmarks/gpu_check.sh                        # the GPU machine: CUDA, full sizes, <= 9 minutes
    bash benchmarks/gpu_check.sh --device cpu --quick   # CPU-sized, the same stages (the CI test runs this)
    bash benchmarks/gpu_check.sh --stages env tests     # a subset
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
STAGES = Path(__file__).with_name("gpu_stages.py")
# Each stage's time box in seconds (full, --quick). The full boxes add up to 525 s: 9 minutes with the starts.
BOXES = {
    "env": (15, 60),
    "tests": (70, 120),
    "train_step": (160, 240),  # two processes (batch 64, 512), each compiling its own networks
    "ingest": (20, 60),
    "train": (170, 150),  # up to 2 minutes of training after the compile
    "ddp": (55, 120),
    "export": (35, 90),
}
MIN_BOX_S = 10  # a stage left with less than this is skipped, not started

ENV_PROBE = """
import json, os, sys, torch
import torch.distributed as d
cuda = torch.cuda.is_available()
info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda_available": cuda,
        "cuda": torch.version.cuda, "cpu_count": os.cpu_count()}
def add(key, get):  # one odd field (an old torch, a driver quirk) must not hide the others
    try:
        info[key] = get()
    except Exception as e:
        info[key] = f"not measurable: {type(e).__name__}: {e}"
if cuda:
    add("device", lambda: torch.cuda.get_device_name(0))
    add("devices", torch.cuda.device_count)
    add("capability", lambda: ".".join(map(str, torch.cuda.get_device_capability(0))))
    add("memory_gib", lambda: round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    add("bf16", torch.cuda.is_bf16_supported)
    add("cudnn", torch.backends.cudnn.version)
    add("nccl", lambda: str(torch.cuda.nccl.version()) if d.is_nccl_available() else "not available")
    add("triton", lambda: __import__("triton").__version__)
# torch.compile's inductor needs a C compiler (triton builds its launcher with it): name it before compile stages fail.
import shutil
info["c_compiler"] = shutil.which("gcc") or shutil.which("cc") or "not found"
print(json.dumps(info))
"""


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def run_stage(name: str, box_s: float, args: argparse.Namespace, work: Path, extra: list[str]) -> dict[str, Any]:
    """One stage in its own process group, killed whole at the end of its box; its figures read back either way."""
    out = work / f"{name}.json"
    log = work / f"{name}.log"
    cmd = [sys.executable, str(STAGES), name, "--device", args.device, "--work", str(work), "--out", str(out)]
    cmd += ["--seconds", f"{box_s:.0f}", *(["--quick"] if args.quick else []), *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=box_s)
            status = "ok" if code == 0 else "failed"
        except subprocess.TimeoutExpired:
            for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):  # the stage and everything it started
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=grace)
                    break
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    continue
            status = "timed out"
    record: dict[str, Any] = {"status": status, "seconds": round(time.monotonic() - t0, 1), "box_s": round(box_s)}
    if out.is_file():
        record.update(json.loads(out.read_text()))
    if status != "ok":
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        why = f"ran past its {box_s:.0f} s box" if status == "timed out" else "exited with an error"
        record["reason"] = f"{why}: " + " | ".join(lines[-4:])[-600:]
    return record


def figure_line(name: str, r: dict[str, Any]) -> str:
    def f(v: Any, fmt: str = "{:.1f}") -> str:  # a number in its format, or the "not measurable: ..." text as is
        return fmt.format(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)

    head = f"{name:<10} {r['status']:<9} {r['seconds']:>6.1f} s"
    if r["status"] != "ok":
        return f"{head}  {r.get('reason', '')[:160]}"
    if name == "env":
        device = r.get("device", "no CUDA")
        versions = f"cuda {r.get('cuda')}, nccl {r.get('nccl')}, triton {r.get('triton')}, cc {r.get('c_compiler')}"
        return f"{head}  torch {r.get('torch')}, {device}, {versions}"
    if name == "tests":
        return f"{head}  {r['passed']} passed, {r['failed']} failed, {r['skipped']} skipped"
    if name == "train_step":
        parts = []
        for k, v in r.items():
            if k.startswith("batch_") and isinstance(v, str):
                parts.append(f"{k}: {v}")
            elif k.startswith("batch_"):
                rate, ratio, peak = v["medgan_img_per_s"], v["ratio"], v["fraction_of_bf16_peak"]
                parts.append(f"{k}: {rate:.0f} img/s, {ratio:.2f}x plain, bf16 peak {f(peak, '{:.1%}')}")
        return f"{head}  " + "; ".join(parts)
    if name == "train":
        c = r["compile"]
        return (f"{head}  {f(r['img_per_s'], '{:.0f}')} img/s; compile {c['took_effect']} "
                f"(first step {f(c['first_step_compile_s'], '{:.1f} s')}), bf16 {r['bf16']['took_effect']}, "
                f"channels_last {r['channels_last']['took_effect']}")  # fmt: skip
    if name == "ingest":
        return f"{head}  {r['slices']} slices ({r['train_slices']} train), classes {', '.join(r['classes'])}"
    if name == "ddp":
        return f"{head}  {r['env']}, {f(r['img_per_s'], '{:.0f}')} img/s"
    if name == "export":
        return (f"{head}  {r['compared']}: max |diff| {r['max_abs_diff_float16_slices']:.2e} (float16 slices), "
                f"{r['max_png8_grey_level_diff']:g} grey levels (PNG8)")  # fmt: skip
    return f"{head}  {r}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (the GPU machine) or cpu")
    parser.add_argument("--quick", action="store_true", help="CPU-sized: the same stages, each a few seconds")
    parser.add_argument("--stages", nargs="+", choices=list(BOXES), default=list(BOXES))
    parser.add_argument("--budget-s", type=float, default=None, help="the whole check (default: 530 s, quick 900 s)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak (default: a table by name)")
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a new temporary one)")
    args = parser.parse_args()
    budget = args.budget_s or (900 if args.quick else 530)
    deadline = time.monotonic() + budget
    work = args.work or Path(tempfile.mkdtemp(prefix="medgan-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)

    report: dict[str, Any] = {"device_requested": args.device, "quick": args.quick, "budget_s": budget, "stages": {}}
    report["work"], report["order"] = str(work), list(args.stages)  # the JSON's keys are sorted: the run order
    path = None
    for i, name in enumerate(args.stages):
        later = sum(min(BOXES[s][args.quick], 3 * MIN_BOX_S) for s in args.stages[i + 1 :])
        box = min(BOXES[name][args.quick], deadline - time.monotonic() - later)
        extra = ["--peak-tflops", str(args.peak_tflops)] if args.peak_tflops else []
        rate = next((v["medgan_img_per_s"] for k, v in report["stages"].get("train_step", {}).items()
                     if k.startswith("batch_") and isinstance(v, dict)), None)  # fmt: skip
        if rate:
            extra += ["--img-per-s", f"{rate:.1f}"]
        if box < MIN_BOX_S:
            why = f"not measurable: the {budget:.0f} s budget ran out"
            record = {"status": "skipped", "seconds": 0.0, "reason": why}
        elif name == "env":
            record = probe_env(box)
        else:
            record = run_stage(name, box, args, work, extra)
        report["stages"][name] = record
        print(figure_line(name, record), flush=True)
        if name == "env" and args.device.startswith("cuda") and not record.get("cuda_available"):
            print("gpu_check: CUDA is not available here (nothing written); on a CPU: --device cpu --quick", flush=True)
            return 2
        path = path or results_path(args, report)
        report["total_s"] = round(budget - (deadline - time.monotonic()), 1)
        save(path, report)  # after every stage: a check cut short still leaves what it measured

    ok = all(r["status"] == "ok" for r in report["stages"].values()) and len(report["stages"]) == len(args.stages)
    print(f"gpu_check: {'all stages ok' if ok else 'some stages failed'} in {report['total_s']:.0f} s; wrote {path}")
    return 0 if ok else 1


def results_path(args: argparse.Namespace, report: dict[str, Any]) -> Path:
    """``<results>/<device>.json``: the CUDA device's name (from the env stage) in lower case, or ``cpu``."""
    name = str(report["stages"].get("env", {}).get("device", ""))
    if not args.device.startswith("cuda"):
        slug = "cpu"
    elif name and not name.startswith("not measurable"):
        slug = device_slug(name)
    else:
        slug = "cuda"
    report["device"] = slug
    return args.results / f"{slug}{'-quick' if args.quick else ''}.json"


def save(path: Path, report: dict[str, Any]) -> None:
    sys.path.insert(0, str(ROOT))
    from medgan.io import atomic_write_json

    merged = json.loads(path.read_text()) if path.is_file() else {}
    merged["gpu_check"] = report
    atomic_write_json(path, merged)


def probe_env(box_s: float) -> dict[str, Any]:
    t0 = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-c", ENV_PROBE], capture_output=True, text=True, timeout=box_s)
    except subprocess.TimeoutExpired:
        return {"status": "timed out", "seconds": round(time.monotonic() - t0, 1), "reason": "importing torch hung"}
    record: dict[str, Any] = {"status": "ok" if proc.returncode == 0 else "failed"}
    record["seconds"] = round(time.monotonic() - t0, 1)
    if proc.returncode == 0:
        record.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    else:
        record["reason"] = proc.stderr.strip()[-600:]
    return record


if __name__ == "__main__":
    sys.exit(main())
