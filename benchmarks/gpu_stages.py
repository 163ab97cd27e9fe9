"""The stages of the GPU check, one process each: `gpu_check.py` runs ``gpu_stages.py STAGE ...`` under a time box.

Every stage writes its figures to ``--out`` (JSON), after each sub-measurement, so a stage killed by its time box still
leaves what it had measured. A figure that cannot be taken is the string ``"not measurable: <reason>"``, never a gap.

Stages: ``tests`` (the gpu-marked tests), ``train_step`` (`train_step.py` at each batch), ``ingest`` (the bundled
sample from ``data/sample``), ``train`` (configs/train/gpu.yaml through `medgan.train.loop.train`, compile on),
``ddp`` (``torchrun --nproc_per_node 1`` through ``medgan train``: NCCL on CUDA, gloo on CPU) and ``export`` (the same
export on the device and on the CPU, compared pixel by pixel).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# The CPU-sized network and schedule of --quick: the same steps as on the GPU, each a few seconds on 2 cores.
QUICK_MODEL = [
    "model.width=8", "model.z_dim=32", "model.embed_dim=16", "model.g_max_channels=64", "model.d_max_channels=64",
    "model.d_reduce_channels=4",
]  # fmt: skip
QUICK_TRAIN = ["train.batch_size=16", "train.samples_per_class=2", "train.ema_kimg=0.1"]


def not_measurable(reason: str) -> str:
    return f"not measurable: {reason}"


class Fragment:
    """The stage's figures, rewritten to `path` (atomically) whenever one is added."""

    def __init__(self, path: Path):
        self.path, self.data = path, {}

    def update(self, **figures: Any) -> None:
        from medgan.io import atomic_write_json

        self.data.update(figures)
        atomic_write_json(self.path, self.data)


def child(cmd: list[str], timeout_s: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a command below this stage's own time box; its output is kept for the record."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=max(timeout_s, 1))


def tail(text: str, n: int = 6) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-n:])


def stage_tests(args: argparse.Namespace, out: Fragment) -> None:
    # --quick collects tests/test_gpu.py alone (collecting the whole suite costs more than the tests on 2 cores).
    paths = ["tests/test_gpu.py"] if args.quick else ["tests"]
    junit = args.work / "gpu_tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", *paths, "-q", "-p", "no:cacheprovider", f"--junitxml={junit}"]
    proc = child(cmd, args.seconds - 5, env={"MEDGAN_TEST_DEVICE": args.device})
    if not junit.is_file():
        raise RuntimeError(f"pytest wrote no report (exit {proc.returncode}): {tail(proc.stdout + proc.stderr)}")
    suite = ET.parse(junit).getroot().iter("testsuite").__next__()
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = []
    for case in suite.iter("testcase"):
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:  # (an Element without children is falsy: compare with None)
            failed.append(f"{case.get('name')}: {bad.get('message', '')[:200]}")
    out.update(
        device=args.device,
        paths=paths,
        passed=counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
        failed=counts["failures"] + counts["errors"],
        skipped=counts["skipped"],
        failures=failed,
        exit_code=proc.returncode,
        summary=tail(proc.stdout, 1),
    )
    if failed or proc.returncode not in (0, 5):  # 5: nothing collected (no gpu-marked tests)
        raise RuntimeError(f"gpu tests: {tail(proc.stdout, 1)}")


def stage_train_step(args: argparse.Namespace, out: Fragment) -> None:
    # On the GPU one process per batch: a time-out at 512 keeps 64, and no compiled shape carries over. --quick runs
    # both batches in one process: a process start (torch, the probes) costs more than the CPU-sized steps.
    if args.quick:
        groups = [[4, 8]]
        size = ["--width", "8", "--steps", "1", "--repeats", "1", "--n-images", "16", "--matmul-n", "256"]
    else:
        groups, size = [[64], [512]], ["--width", "64", "--steps", "30", "--repeats", "2", "--n-images", "4096"]
    deadline = time.monotonic() + args.seconds - 5
    for i, batches in enumerate(groups):
        left = (deadline - time.monotonic()) / (len(groups) - i)
        folder = args.work / ("train_step_" + "_".join(map(str, batches)))
        cmd = [sys.executable, "benchmarks/train_step.py", "--device", args.device, "--batches", *map(str, batches)]
        cmd += [*size, "--results", str(folder)]
        cmd += ["--peak-tflops", str(args.peak_tflops)] if args.peak_tflops else []
        try:
            proc = child(cmd, left)
            files = list(folder.glob("*.json"))
            if proc.returncode or not files:
                raise RuntimeError(f"train_step.py failed: {tail(proc.stderr)}")
        except (subprocess.TimeoutExpired, RuntimeError) as e:
            why = f"train_step.py ran past its {left:.0f} s share" if isinstance(e, subprocess.TimeoutExpired) else e
            out.update(**{f"batch_{b}": not_measurable(str(why)) for b in batches})
            continue
        ts = json.loads(files[0].read_text())["train_step"]
        for b in batches:
            r = ts["results"][f"batch_{b}"]
            peak = r["medgan_fraction_of_bf16_peak"]
            out.update(
                **{
                    f"batch_{b}": {
                        "medgan_img_per_s": r["medgan_img_per_s"],
                        "baseline_img_per_s": r["baseline_img_per_s"],
                        "ratio": r["ratio"],
                        "fraction_of_bf16_peak": peak
                        if peak is not None
                        else not_measurable("no nominal bf16 peak for this device (give --peak-tflops)"),
                        "fraction_of_measured_matmul_peak": r["medgan_fraction_of_peak"],
                        "data_img_per_s": r["data_img_per_s"],
                    }
                }
            )
        out.update(
            medgan_env=ts["medgan_env"],
            gflop_per_image_step=ts["gflop_per_image_step"],
            bf16_dense_peak_tflops=ts["bf16_dense_peak_tflops"] or not_measurable("not in the table"),
            matmul_peak_tflops=ts["matmul_peak_tflops"],
            settings=" ".join(size),
        )
    missing = {k: v for k, v in out.data.items() if k.startswith("batch_") and isinstance(v, str)}
    if missing:
        raise RuntimeError(f"train_step: {missing}")


def dataset_path(work: Path) -> Path:
    return work / "datasets" / "sample"


def stage_ingest(args: argparse.Namespace, out: Fragment) -> None:
    from medgan.config import load_config
    from medgan.dataset import SliceDataset
    from medgan.ingest import run_ingest

    cfg = load_config([ROOT / "configs/ingest/sample_ct_organs.yaml"], ["ingest.workers=2"])
    t0 = time.perf_counter()
    report = run_ingest(
        cfg, dataset_path(args.work), manifest=ROOT / "data_manifests/sample.csv", root=ROOT / "data/sample",
        key_file=args.work / "pseudonym.key", progress=False,
    )  # fmt: skip
    if report.dataset_path is None:
        raise RuntimeError("the bundled sample gave no slices")
    ds = SliceDataset.open(report.dataset_path)
    out.update(
        seconds=time.perf_counter() - t0,
        slices=len(ds),
        train_slices=int(len(ds.indices("train"))),
        classes=ds.classes,
        source="data/sample via data_manifests/sample.csv",
    )


def train_config(args: argparse.Namespace, kimg: float, extra: list[str]) -> list[str]:
    sets = [f"train.device={args.device}", f"train.total_kimg={kimg:g}", *extra]
    if args.quick:
        sets += QUICK_MODEL + QUICK_TRAIN + [f"train.{k}_every_kimg={kimg / 2:g}" for k in ("log", "sample", "ckpt")]
    return sets


def stage_train(args: argparse.Namespace, out: Fragment) -> None:
    import torch

    from medgan import checkpoint
    from medgan.config import load_config
    from medgan.tracking.runs import Tracker
    from medgan.tracking.store import experiment_runs
    from medgan.train.loop import train

    # Up to 2 minutes, sized from the step's measured rate (train_step at batch 64) with a margin for the recipe's
    # augmentation, sample grids and checkpoints; a low guess when that rate is unknown (short beats killed).
    train_s = min(120.0, max(args.seconds - 55, 10))
    rate = args.img_per_s or 2000.0
    kimg = 0.064 if args.quick else round(0.6 * rate * train_s / 1000, 1)
    uri = f"sqlite:///{args.work / 'mlflow.db'}"
    sets = train_config(args, kimg, [f"track.tracking_uri={uri}", "track.experiment=gpu-check", "track.register=false",
                                     "train.progress=false", "train.compile=auto"])  # fmt: skip
    cfg = load_config([ROOT / "configs/train/gpu.yaml"], sets)
    out.update(planned_kimg=kimg, rate_used_for_plan=rate, overrides=[s for s in sets if "tracking_uri" not in s])
    t0 = time.perf_counter()
    result = train(
        cfg, dataset_path(args.work), out_dir=args.work / "runs", resume=None, preset="gpu", tracker=Tracker(cfg.track)
    )
    wall = time.perf_counter() - t0
    out.update(checkpoint=str(result.checkpoint), env=result.env, wall_s=wall, kimg=result.images_seen / 1000)

    # What the loop logged: its decisions (params) and img/s per log interval (the first one holds the compile).
    run = next(r for r in experiment_runs(uri, "gpu-check", ("perf/img_per_s",)) if r["run_name"] == result.run_name)
    params, logged = run["params"], sorted(run["history"]["perf/img_per_s"])  # [(images seen, img/s)]
    history = [v for _, v in logged]
    seconds = [(n - prev) / v for (n, v), prev in zip(logged, [0] + [n for n, _ in logged[:-1]], strict=True)]
    first_s = seconds[0]
    steady = sorted(history[1:])[len(history[1:]) // 2] if len(history) > 1 else None
    state = checkpoint.load(result.checkpoint)
    weights = list(state["G"].values()) + list(state["D"].values())
    convs = [w for w in weights if w.dim() == 4 and w.shape[-1] > 1]  # 1x1 kernels look contiguous either way
    channels_last = all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    compiled = params.get("env.compile") == "True"
    if not compiled:
        compile_s = not_measurable("compile off")
    elif steady is None:
        compile_s = not_measurable("one log interval only (a run too short for a steady rate)")
    else:
        compile_s = first_s - logged[0][0] / steady  # the first interval less its images at the steady rate
    out.update(
        compile={
            "requested": cfg.train.compile,
            "took_effect": compiled,
            "first_step_compile_s": compile_s,
            "first_log_interval_s": first_s,
            "evidence": f"the run logged env.compile={params.get('env.compile')}; its first log interval took "
            f"{first_s:.1f} s, {logged[0][0] / steady if steady else float('nan'):.2f} s at the run's median rate",
        },
        bf16={
            "requested": cfg.train.precision,
            "took_effect": params.get("env.precision") == "bf16",
            "evidence": f"the run logged env.precision={params.get('env.precision')} (autocast dtype)",
        },
        channels_last={
            "requested": cfg.train.channels_last,
            "took_effect": channels_last,
            "evidence": f"{len(convs)} conv weights of the checkpoint in channels_last: {channels_last}",
        },
        img_per_s=steady if steady else history[-1],
        img_per_s_per_interval=history,
        training_s_after_first_interval=sum(seconds[1:]),
        device=params.get("env.device"),
        alarms=result.alarms,
    )


def stage_ddp(args: argparse.Namespace, out: Fragment) -> None:
    kimg = 0.064 if args.quick else round(0.5 * (args.img_per_s or 2000.0) * 20 / 1000, 1)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m", "medgan",
           "train", "--data", str(dataset_path(args.work)), "--out", str(args.work / "ddp_runs"), "--no-track",
           "--config", "configs/train/gpu.yaml"]  # fmt: skip
    for s in train_config(args, kimg, ["train.progress=false"]):
        cmd += ["--set", s]
    proc = child(cmd, args.seconds - 5)
    text = proc.stdout + proc.stderr
    if proc.returncode:
        raise RuntimeError(f"torchrun exited {proc.returncode}: {tail(text)}")
    env = re.search(r"kimg on (.+)$", proc.stdout, re.M)
    rate = re.search(r"([0-9.]+) img/s", proc.stdout)
    backend = "nccl" if args.device.startswith("cuda") else "gloo"
    described = env.group(1) if env else ""
    out.update(
        backend_expected=backend,
        env=described,
        process_group=f"DDP 1 x {backend}" in described,
        img_per_s=float(rate.group(1)) if rate else not_measurable("no img/s in the summary"),
        kimg=kimg,
        checkpoint=next((str(p) for p in sorted((args.work / "ddp_runs").rglob("ckpt-*.pt"))), "none written"),
    )
    if not out.data["process_group"]:
        raise RuntimeError(f"the run did not join a {backend} process group: {described!r}")


def stage_export(args: argparse.Namespace, out: Fragment) -> None:
    import numpy as np
    import torch

    from medgan.config import load_config
    from medgan.dataset import SliceDataset
    from medgan.export import read_image, run_export

    previous = [json.loads(p.read_text()).get("checkpoint") for p in (args.work / "train.json", args.work / "ddp.json")
                if p.is_file()]  # fmt: skip
    ckpt = next((c for c in previous if c and Path(c).is_file()), None)
    if ckpt is None:
        raise RuntimeError("no checkpoint to export: the train and ddp stages both failed")
    n = 4 if args.quick else 64
    on = {"device": args.device, "cpu": "cpu"}  # without CUDA: the same export twice, which must give the same bytes
    results: dict[str, SliceDataset] = {}
    for key, device in on.items():
        cfg = load_config([], [f"export.device={device}", f"export.n_per_class={n}", "export.format=png"])
        t0 = time.perf_counter()
        run_export(cfg, ckpt, args.work / f"export_{key}", force=True)
        results[key] = SliceDataset.open(args.work / f"export_{key}")
        out.update(**{f"{key}_seconds": time.perf_counter() - t0})
    a, b = (results[k].images.astype(np.float32) for k in ("device", "cpu"))
    levels = [
        np.abs(read_image(f).astype(np.float64) - read_image(args.work / "export_cpu" / f.relative_to(
            args.work / "export_device")).astype(np.float64)).max() * 127.5
        for f in sorted((args.work / "export_device" / "images").rglob("*.png"))
    ]  # fmt: skip
    cross = args.device.startswith("cuda") and torch.cuda.is_available()
    figures = {
        "images": int(len(a)),
        "max_abs_diff_float16_slices": float(np.abs(a - b).max()),
        "fraction_of_pixels_differing": float((a != b).mean()),
        "max_png8_grey_level_diff": round(float(max(levels)), 3),
    }
    out.update(
        checkpoint=ckpt,
        compared=f"{args.device} vs cpu" if cross else not_measurable("no CUDA: cpu vs cpu, the same export twice"),
        **figures,
    )
    if not cross:
        out.update(same_device_identical=bool(np.array_equal(a, b)))


STAGES = {
    "tests": stage_tests,
    "train_step": stage_train_step,
    "ingest": stage_ingest,
    "train": stage_train,
    "ddp": stage_ddp,
    "export": stage_export,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("stage", choices=list(STAGES))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--work", type=Path, required=True, help="the check's scratch folder, shared by its stages")
    parser.add_argument("--out", type=Path, required=True, help="this stage's figures (JSON)")
    parser.add_argument("--seconds", type=float, default=60.0, help="this stage's time box")
    parser.add_argument("--img-per-s", type=float, default=None, help="medgan's step rate at batch 64, if measured")
    parser.add_argument("--peak-tflops", type=float, default=None)
    args = parser.parse_args()
    STAGES[args.stage](args, Fragment(args.out))


if __name__ == "__main__":
    main()
