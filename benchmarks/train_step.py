"""Training throughput: medgan's step against a plain-PyTorch loop of the same architecture, as tutorials write it.

The baseline (the PyTorch DCGAN tutorial pattern): fp32, D wrapped in a Sigmoid with BCELoss, separate D passes on real
and on fake, a third D pass for the G step that also builds D's weight gradients, a DataLoader over PNG files (2
workers, decode + normalise per item), and `.item()` on the losses every step. medgan's step is the real one
(`medgan.train.loop.train`): one concatenated D pass, a frozen D in the G step, the training set resident on the device,
on-device batches and augmentation, bf16 autocast where supported, lazy R1 and EMA, metrics read only at log intervals.

Both run interleaved (A, B, A, B, ...) at batch 32 and 64; img/s is the median over repeats. FLOPs per image per step
are counted once with torch.utils.flop_counter on the algorithm's useful work (G fwd+bwd, D fwd+bwd on real and fake,
D fwd + input grad for G) and related to the machine's matmul peak, measured with a large bf16 and fp32 matmul, and
to the device's nominal dense bf16 peak (`BF16_DENSE_PEAK_TFLOPS` by device name, or ``--peak-tflops``).
Results are merged into ``benchmarks/results/<device>.json`` under ``"train_step"`` (other keys are kept).

Usage:
    python benchmarks/train_step.py                          # full DCGAN-128 widths, CPU, 2 repeats
    python benchmarks/train_step.py --width 32 --steps 3     # quick look on a busy machine
    python benchmarks/train_step.py --device cuda --steps 50 --batches 64 512 --n-images 4096
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from medgan.config import Config
from medgan.data import DeviceFeeder
from medgan.dataset import SliceDataset, write_dataset
from medgan.io import atomic_write_json
from medgan.models.discriminator import Discriminator
from medgan.models.generator import Generator
from medgan.train import dist
from medgan.train.loop import train

# Nominal dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from the vendors' data sheets, matched in order against
# the lower-cased CUDA device name; the first match wins, so the more specific names come first.
BF16_DENSE_PEAK_TFLOPS = (
    ("h100 pcie", 756.0),
    ("h100 nvl", 835.0),
    ("h100", 989.0),  # SXM
    ("h200", 989.0),
    ("gh200", 989.0),
    ("b200", 2250.0),
    ("a100", 312.0),
    ("l40s", 362.0),
    ("l4", 121.0),
    ("a10", 125.0),
)


def nominal_bf16_peak(device: str) -> float | None:
    """The device's dense bf16 peak in FLOP/s from `BF16_DENSE_PEAK_TFLOPS`, or None when it is not in the table."""
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device).lower()
    return next((tflops * 1e12 for key, tflops in BF16_DENSE_PEAK_TFLOPS if key in name), None)


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    return "cpu"


def synthetic_dataset(out: Path, n: int = 512) -> Path:
    """Smooth random blobs in two classes, written through the real dataset contract."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:128, 0:128] / 128.0
    images = np.empty((n, 1, 128, 128), dtype=np.float32)
    for i in range(n):
        cx, cy, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.1, 0.3) * (1 + i % 2)
        images[i, 0] = np.where((xx - cx) ** 2 + (yy - cy) ** 2 < r * r, 0.5, -1.0) + 0.05 * rng.standard_normal(
            (128, 128)
        )
    images = np.clip(images, -1, 1)
    rows = [
        dict(split="train", label=i % 2, patient=f"p{i}", volume=f"v{i}", slice_index=0, position_mm=0.0,
             spacing_mm=1.0, modality="MR", seed="")
        for i in range(n)
    ]  # fmt: skip
    write_dataset(out, images, rows, ["small", "large"])
    return out


def config(width: int, batch: int, device: str) -> Config:
    cfg = Config()
    cfg.model.width = width
    cfg.model.g_max_channels, cfg.model.d_max_channels = 16 * width, 8 * width
    cfg.model.d_reduce_channels = width // 2
    cfg.train.batch_size, cfg.train.device, cfg.train.progress = batch, device, False
    cfg.track.enabled = cfg.track.register = False
    return cfg


def medgan_img_per_s(data: Path, cfg: Config, steps: int, out: Path) -> float:
    """The real loop: warm up for `steps`, then time `steps` more from its own perf/img_per_s metric."""
    b = cfg.train.batch_size
    cfg.train.log_every_kimg = steps * b / 1000
    cfg.train.total_kimg = 2 * steps * b / 1000
    cfg.train.sample_every_kimg = cfg.train.ckpt_every_kimg = cfg.train.total_kimg
    return train(cfg, data, out_dir=out, resume=None, preset="bench").metrics["perf/img_per_s"]


class PngFiles(torch.utils.data.Dataset):
    """One PNG per slice, decoded and normalised per item, as an ImageFolder pipeline does."""

    def __init__(self, folder: Path, labels: np.ndarray):
        self.files, self.labels = sorted(folder.glob("*.png")), labels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from PIL import Image

        x = torch.from_numpy(np.asarray(Image.open(self.files[i]), dtype=np.float32) / 127.5 - 1.0)[None]
        return x, int(self.labels[i])


def write_pngs(ds: SliceDataset, folder: Path) -> None:
    from medgan.viz import save_png, to_uint8

    for i, img in enumerate(ds.images):
        save_png(to_uint8(img[0]), folder / f"{i:06d}.png")


def baseline_img_per_s(ds: SliceDataset, pngs: Path, cfg: Config, steps: int, device: str) -> float:
    """The tutorial loop: fp32, Sigmoid + BCELoss, 3 D passes, D weight grads in the G step, .item() every step."""
    torch.manual_seed(0)
    nc, b = len(ds.classes), cfg.train.batch_size
    netG = Generator.from_config(cfg.model, nc).to(device)
    netD = Discriminator.from_config(cfg.model, nc).to(device)
    sigmoid, criterion = nn.Sigmoid(), nn.BCELoss()
    optD = torch.optim.Adam(netD.parameters(), lr=2e-4, betas=(0.5, 0.999))
    optG = torch.optim.Adam(netG.parameters(), lr=2e-4, betas=(0.5, 0.999))
    loader = torch.utils.data.DataLoader(
        PngFiles(pngs, ds.labels), batch_size=b, shuffle=True, num_workers=2, drop_last=True
    )
    done, t0, losses = 0, 0.0, []
    while done < 2 * steps:
        for real, y in loader:
            if done == steps:
                t0 = time.perf_counter()  # warm-up over, as for medgan
            real, y = real.to(device), y.to(device)
            netD.zero_grad()
            out = sigmoid(netD(real, y))
            errD_real = criterion(out, torch.ones_like(out))
            errD_real.backward()
            fake = netG(torch.randn(b, cfg.model.z_dim, device=device), y)
            out = sigmoid(netD(fake.detach(), y))
            errD_fake = criterion(out, torch.zeros_like(out))
            errD_fake.backward()
            optD.step()
            netG.zero_grad()
            out = sigmoid(netD(fake, y))
            errG = criterion(out, torch.ones_like(out))
            errG.backward()
            optG.step()
            losses.append((errD_real.item() + errD_fake.item(), errG.item()))
            done += 1
            if done == 2 * steps:
                break
    return steps * b / (time.perf_counter() - t0)


def step_flops(cfg: Config, nc: int, device: str) -> float:
    """FLOPs per image of one GAN step's useful work, counted (not estimated) with FlopCounterMode."""
    b = 4
    G = Generator.from_config(cfg.model, nc).to(device)
    D = Discriminator.from_config(cfg.model, nc).to(device)
    y, z = torch.zeros(b, dtype=torch.long, device=device), torch.randn(b, cfg.model.z_dim, device=device)
    real = torch.zeros(b, 1, 128, 128, device=device)
    with FlopCounterMode(display=False) as counter:
        fake = G(z, y)
        D(torch.cat([real, fake.detach()]), torch.cat([y, y])).sum().backward()  # D step
        D.requires_grad_(False)
        D(fake, y).sum().backward()  # G step: input gradient through D, then G's backward
    return counter.get_total_flops() / b


PROBES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def matmul_peak(device: str, dtype: torch.dtype, n: int = 4096, reps: int = 5) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        (a @ b).sum().item()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def data_img_per_s(ds: SliceDataset, device: str, batch: int, reps: int = 50) -> float:
    """The on-device feeder alone: index + gather + cast, per image."""
    feeder = DeviceFeeder(ds, torch.device(device))
    feeder.batch(0, batch)
    t0 = time.perf_counter()
    for k in range(reps):
        x, _ = feeder.batch(k * batch, batch)
    float(x[0, 0, 0, 0])
    return reps * batch / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--width", type=int, default=64, help="64 = DCGAN-128 widths (1024 channels at 4x4)")
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement (after as many warm-up)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--data", type=Path, default=None, help="a slice dataset (default: synthetic slices)")
    parser.add_argument("--n-images", type=int, default=512, help="synthetic slices (a few largest batches)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak (default: table)")
    parser.add_argument("--matmul-n", type=int, default=4096, help="size of the square matmuls that probe the peak")
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = args.data or synthetic_dataset(tmp / "bench", args.n_images)
        ds = SliceDataset.open(data)
        write_pngs(ds, tmp / "png")
        env = dist.setup(config(args.width, 32, args.device).train)
        flops = step_flops(config(args.width, 32, args.device), len(ds.classes), args.device)
        peak = {k: matmul_peak(args.device, dtype, args.matmul_n) for k, dtype in PROBES.items()}
        nominal = args.peak_tflops * 1e12 if args.peak_tflops else nominal_bf16_peak(args.device)
        print(f"{flops / 1e9:.2f} GFLOP per image per step; matmul peak bf16 {peak['bf16'] / 1e12:.2f} TFLOP/s, "
              f"fp32 {peak['fp32'] / 1e12:.2f} TFLOP/s; medgan runs {env.describe()}")  # fmt: skip
        runs: dict[int, dict[str, list[float]]] = {b: {"medgan": [], "baseline": []} for b in args.batches}
        for rep in range(args.repeats):  # interleaved A/B so load drifts hit both alike
            for b in args.batches:
                cfg = config(args.width, b, args.device)
                runs[b]["medgan"].append(medgan_img_per_s(data, cfg, args.steps, tmp / "runs"))
                runs[b]["baseline"].append(baseline_img_per_s(ds, tmp / "png", cfg, args.steps, args.device))
                print(f"repeat {rep} batch {b}: medgan {runs[b]['medgan'][-1]:.1f} img/s, "
                      f"baseline {runs[b]['baseline'][-1]:.1f} img/s")  # fmt: skip
        results = {}
        peak_used = peak["fp32"] if env.dtype is None else peak["bf16"]
        for b in args.batches:
            m, base = statistics.median(runs[b]["medgan"]), statistics.median(runs[b]["baseline"])
            feed = data_img_per_s(ds, args.device, b)
            results[f"batch_{b}"] = {
                "medgan_img_per_s": m,
                "baseline_img_per_s": base,
                "ratio": m / base,
                "medgan_fraction_of_peak": m * flops / peak_used,
                "medgan_fraction_of_bf16_peak": m * flops / nominal if nominal else None,
                "baseline_fraction_of_fp32_peak": base * flops / peak["fp32"],
                "data_img_per_s": feed,
                "data_over_step": feed / m,
            }
            r = results[f"batch_{b}"]
            print(f"batch {b}: medgan {m:.1f} img/s vs baseline {base:.1f} img/s = {r['ratio']:.2f}x; "
                  f"{100 * r['medgan_fraction_of_peak']:.1f}% of {env.precision} matmul peak; "
                  f"data path {feed:.0f} img/s ({r['data_over_step']:.0f}x the step)")  # fmt: skip

    path = args.results / f"{device_name(args.device)}.json"
    merged = json.loads(path.read_text()) if path.is_file() else {}
    merged["train_step"] = {
        "device": device_name(args.device),
        "torch": torch.__version__,
        "medgan_env": env.describe(),
        "width": args.width,
        "steps": args.steps,
        "repeats": args.repeats,
        "gflop_per_image_step": flops / 1e9,
        "load_avg_1m_at_end": os.getloadavg()[0],  # a busy shared machine depresses both sides and the peak
        "matmul_peak_tflops": {k: v / 1e12 for k, v in peak.items()},
        "bf16_dense_peak_tflops": nominal / 1e12 if nominal else None,
        "bf16_dense_peak_source": "--peak-tflops" if args.peak_tflops else ("table" if nominal else None),
        "n_images": args.n_images if args.data is None else len(ds),
        "results": results,
    }
    atomic_write_json(path, merged)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
