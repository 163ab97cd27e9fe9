"""Export throughput: images/s for each format, medgan's batched + threaded export vs a plain-PyTorch baseline.

The baseline is what a script would do without medgan: generate one image at a time and write each file in turn
(same generator, same encoders). Results are merged into ``benchmarks/results/<device>.json`` under ``"export"``
(other keys are kept).

Usage:
    python benchmarks/export.py                  # default-size generator, 16 images per class, 2 classes, CPU
    python benchmarks/export.py --n-per-class 256 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from medgan.config import Config, ModelConfig
from medgan.export import export_dataset, image_seed
from medgan.export.formats import encode
from medgan.io import atomic_write_json
from medgan.models.generator import Generator, LoadedGenerator, generate

VARIANTS = {"png8": ("png", 8), "png16": ("png", 16), "npy": ("npy", 8), "nifti": ("nifti", 8), "dicom": ("dicom", 8)}


def device_name(device: str) -> str:
    """A file-name-safe name of the machine the benchmark ran on (GPU model, else ``cpu``)."""
    if device.startswith("cuda"):
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    return "cpu"


def baseline_images_per_s(loaded: LoadedGenerator, fmt: str, bits: int, n: int, device: str, folder: Path) -> float:
    """One image at a time, one file after another: the loop medgan's export replaces."""
    from medgan.export.dicom import dicom_bytes, new_series

    series = new_series("1.2.3", loaded.classes[0], 0, "", 1.0) if fmt == "dicom" else None
    folder.mkdir(parents=True, exist_ok=True)
    G = loaded.G.to(device)
    t0 = time.perf_counter()
    for i in range(n):
        image = generate(G, [0], [image_seed(0, 0, i)], device, 1)[0]
        data = dicom_bytes(image, series, i + 1, i) if fmt == "dicom" else encode(fmt, image, png_bits=bits)
        (folder / f"{i:05d}").write_bytes(data)
    return n / (time.perf_counter() - t0)


def encode_images_per_s(fmt: str, bits: int, images: np.ndarray) -> float:
    """Encoder throughput alone (one thread, no generator, no disk): what each format costs per image."""
    from medgan.export.dicom import dicom_bytes, new_series

    series = new_series("1.2.3", "c", 0, "", 1.0) if fmt == "dicom" else None
    t0 = time.perf_counter()
    for i, image in enumerate(images):
        dicom_bytes(image, series, i + 1, i) if fmt == "dicom" else encode(fmt, image, png_bits=bits)
    return len(images) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-per-class", type=int, default=16)
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--width", type=int, default=64, help="generator width (64 = the recipe default)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    torch.manual_seed(0)
    mc = ModelConfig(width=args.width)
    G = Generator.from_config(mc, args.classes)
    loaded = LoadedGenerator(G, [f"class{i}" for i in range(args.classes)], mc, info={"model_uri": "benchmark"})
    results: dict[str, dict[str, float]] = {}
    sample = generate(G, [0] * 64, list(range(64)), args.device, 64)
    with tempfile.TemporaryDirectory() as tmp:
        for name, (fmt, bits) in VARIANTS.items():
            cfg = Config()
            e = cfg.export
            e.format, e.png_bits, e.n_per_class, e.batch_size, e.device = (
                fmt,
                bits,
                args.n_per_class,
                args.batch_size,
                args.device,
            )
            res = export_dataset(loaded, cfg, Path(tmp) / name, progress=False)
            write_s = res.seconds - res.generate_seconds
            n_base = min(args.n_per_class, 16)
            base = baseline_images_per_s(loaded, fmt, bits, n_base, args.device, Path(tmp) / f"base-{name}")
            results[name] = {
                "images": res.n_images,
                "images_per_s": round(res.images_per_s, 2),
                "generate_images_per_s": round(res.n_images / max(res.generate_seconds, 1e-9), 2),
                "write_and_dataset_seconds": round(write_s, 3),
                "baseline_images_per_s": round(base, 2),
                "speedup_vs_baseline": round(res.images_per_s / base, 2),
                "encode_images_per_s": round(encode_images_per_s(fmt, bits, sample), 1),
            }
            r = results[name]
            speedup, enc = r["speedup_vs_baseline"], r["encode_images_per_s"]
            print(f"{name:6s} {r['images_per_s']:8.1f} img/s (baseline {base:.1f}, x{speedup:.2f}; encode {enc:.1f}/s)")
    device = device_name(args.device)
    path = args.results / f"{device}.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    data["export"] = {
        "device": args.device,
        "host": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),  # other work on the machine skews CPU timings
        "generator_width": args.width,
        "n_per_class": args.n_per_class,
        "classes": args.classes,
        "batch_size": args.batch_size,
        "formats": results,
        "median_images_per_s": float(np.median([r["images_per_s"] for r in results.values()])),
    }
    atomic_write_json(path, data)
    print(f"wrote {path} (key 'export')")


if __name__ == "__main__":
    main()
