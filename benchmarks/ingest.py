"""Ingest throughput: medgan's read + normalize vs a plain MONAI pipeline, side by side, on realistic inputs.

Inputs: (a) an uncompressed and (b) an RLE Lossless 512x512xN int16 CT series written with pydicom, (c) the real
JPEG 2000 CT series from ``../shared/data`` (when present), (d) a synthetic 512x512xN int16 ``.nii.gz``. For each:
slices/s and peak memory of medgan (reader + `normalize_volume`) and of the baseline (MONAI ``LoadImage`` +
``Orientation`` + ``ScaleIntensityRange`` + ``Resize`` per volume), each in a fresh process so peak RSS is its own,
the two alternated ``--rounds`` times: the headline speedup is the median of the rounds' ratios, each round's kept.
Each process runs its pipeline ``--repeats`` times: the first run is reported as ``cold`` (imports done, but first
use of every buffer), the median of the others as the headline ``slices_per_s`` (a worker ingesting many volumes is
warm). medgan's process also times a reference right after each run (the bare gunzip of a ``.nii.gz`` by the decoder
its reader uses, ISA-L's when ``isal`` is installed: the floor under the reader; pydicom's bare ``dcmread`` header
parse of a DICOM folder), so the fraction of that reference is measured on one machine state even on a noisy VM.
Also: the bare gzip decode rates (stdlib and ISA-L), pydicom's bare header-parse rate, normalize + resize alone
(ms/slice), `run_ingest` with 1 vs 2 workers on 12 volumes (one manifest row each) and with ``ingest.fast_gunzip``
false vs true on them, and 1 vs 2 workers on one row naming a folder of 8 DICOM series folders (against one row per
series).
Results are merged into ``benchmarks/results/cpu.json`` under ``"ingest"`` (other keys are kept).

Usage:
    python benchmarks/ingest.py                 # ~5 minutes on 2 cores (100-slice volumes, 3 rounds)
    python benchmarks/ingest.py --quick         # small sizes: checks that it works
"""

from __future__ import annotations

import argparse
import gzip
import json
import multiprocessing as mp
import os
import platform
import resource
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def write_dicom_series(folder: Path, n: int, size: int = 512, syntax: str = "") -> Path:
    """A realistic CT series: int16 with rescale tags, axial, 1 file per slice, shuffled names; uncompressed, or
    compressed with the transfer syntax UID `syntax` (e.g. RLE Lossless, encoded by pylibjpeg-rle)."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, RLELossless, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    body = ((yy - size / 2) ** 2 / (0.4 * size) ** 2 + (xx - size / 2) ** 2 / (0.45 * size) ** 2) < 1
    series_uid, study_uid = generate_uid(), generate_uid()
    for k in range(n):
        img = np.where(body, 1040 + rng.normal(0, 20, (size, size)), 24).astype(np.int16)  # stored = HU + 1024
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study_uid, series_uid, "CT"
        ds.PatientID, ds.PatientName = "BENCH", "Bench^Phantom"
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-200.0, -200.0, 2.5 * k]
        ds.PixelSpacing, ds.SliceThickness = [0.78, 0.78], 2.5
        ds.InstanceNumber = k + 1
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = img.tobytes()
        if syntax:
            ds.compress(syntax, img, encoding_plugin="pylibjpeg" if syntax == RLELossless else "")
        ds.save_as(folder / f"{(k * 7919) % n:04d}.dcm", enforce_file_format=True)
    return folder


def write_nifti(path: Path, n: int, size: int = 512) -> Path:
    import nibabel as nib

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    body = ((yy - size / 2) ** 2 / (0.4 * size) ** 2 + (xx - size / 2) ** 2 / (0.45 * size) ** 2) < 1
    vol = np.empty((size, size, n), np.int16)
    for k in range(n):
        vol[:, :, k] = np.where(body, 40 + rng.normal(0, 20, (size, size)), -1000).astype(np.int16)
    nib.save(nib.Nifti1Image(vol, np.diag([0.78, 0.78, 2.5, 1.0])), path)
    return path


def _medgan(kind: str, path: str) -> int:
    from medgan.config import IngestConfig
    from medgan.ingest import dicom
    from medgan.ingest.nifti import read_nifti
    from medgan.ingest.normalize import normalize_volume
    from medgan.ingest.privacy import Pseudonymizer

    cfg = IngestConfig(min_foreground_fraction=0.0)
    if kind == "nifti":
        vol = read_nifti(path, modality="CT")
        return len(normalize_volume(vol, cfg).images)
    series, _ = dicom.discover_series(Path(path))
    return sum(len(normalize_volume(dicom.read_series(s, Pseudonymizer(b"k" * 32)), cfg).images) for s in series)


def _monai(kind: str, path: str) -> int:
    from monai.transforms import Compose, LoadImage, Orientation, Resize, ScaleIntensityRange

    reader = "PydicomReader" if kind == "dicom" else "NibabelReader"
    pipe = Compose(
        [
            LoadImage(image_only=True, ensure_channel_first=True, reader=reader),
            Orientation(axcodes="RAS"),
            ScaleIntensityRange(a_min=-160, a_max=240, b_min=-1, b_max=1, clip=True),
            Resize(spatial_size=(128, 128, -1), mode="area"),
        ]
    )
    return int(pipe(path).shape[-1])


def _child(fn_name: str, kind: str, path: str, repeats: int, q) -> None:
    import torch

    torch.set_num_threads(1)
    fn = {"medgan": _medgan, "monai": _monai}[fn_name]
    import monai.transforms  # noqa: F401  (imports outside the timed region for both)

    import medgan.ingest.dicom  # noqa: F401

    ref = _reference(kind, path) if fn_name == "medgan" else None
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, ref_times = [], []
    for i in range(repeats):
        t0 = time.perf_counter()
        n = fn(kind, path)
        times.append(time.perf_counter() - t0)
        if i == 0:  # the pipeline's own peak: before the reference (a decode buffer of its own) first runs
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if ref is not None:  # the floor, timed right after each run: both see the same machine state
            t0 = time.perf_counter()
            ref()
            ref_times.append(time.perf_counter() - t0)
    q.put({"slices": n, "times": times, "ref_times": ref_times, "peak_mb": round((peak - base) / 1024, 1)})


def _reference(kind: str, path: str):
    """The reference for this input, as a callable: the bare gunzip of a .nii.gz by the decoder medgan's reader uses
    (the floor under it: the decode alone), or pydicom's bare ``dcmread`` header parse of every file of a DICOM
    folder; None for other inputs."""
    if kind == "nifti" and path.endswith(".gz"):
        raw, inflate = Path(path).read_bytes(), _inflate()
        return lambda: inflate(raw)
    if kind == "dicom":
        import pydicom

        files = sorted(p for p in Path(path).iterdir() if p.is_file())
        return lambda: [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    return None


def measure(fn_name: str, kind: str, path: Path, repeats: int) -> dict:
    """Run one pipeline on one input `repeats` times in a fresh process: warm and cold slices/s, peak RSS added."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(fn_name, kind, str(path), repeats, q))
    p.start()
    res = q.get(timeout=900)
    p.join()
    times, ref_times = res.pop("times"), res.pop("ref_times")
    warm = float(np.median(times[1:])) if len(times) > 1 else times[0]
    res["seconds"] = round(warm, 3)
    res["slices_per_s"] = round(res["slices"] / warm, 1)
    res["cold_slices_per_s"] = round(res["slices"] / times[0], 1)
    if len(ref_times) > 1:  # paired with each warm run: median of (floor time / medgan time)
        pairs = [r / t for t, r in zip(times[1:], ref_times[1:], strict=True)]
        res["paired_fraction_of_floor"] = round(float(np.median(pairs)), 2)
    return res


def measure_pair(kind: str, path: Path, repeats: int, rounds: int) -> tuple[dict, dict, list[float]]:
    """medgan and MONAI in alternating fresh processes, `rounds` times: (medgan's and MONAI's results from the
    round with the median ratio, the speedup of each round). A VM's load drifts over minutes; alternating the two
    and taking the median of paired ratios keeps one slow stretch from deciding the headline."""
    pairs = [(measure("medgan", kind, path, repeats), measure("monai", kind, path, repeats)) for _ in range(rounds)]
    ratios = [m["slices_per_s"] / b["slices_per_s"] for m, b in pairs]
    mid = sorted(range(rounds), key=ratios.__getitem__)[rounds // 2]
    return pairs[mid][0], pairs[mid][1], ratios


def header_rate(folder: Path) -> float:
    """pydicom's bare header parse rate (files/s, ``dcmread(stop_before_pixels=True)``) on the series."""
    import pydicom

    files = sorted(folder.iterdir())
    for f in files[:5]:
        pydicom.dcmread(f, stop_before_pixels=True)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for f in files:
            pydicom.dcmread(f, stop_before_pixels=True)
        best = min(best, time.perf_counter() - t0)
    return round(len(files) / best, 1)


def _inflate():
    """The gunzip medgan's NIfTI reader uses by default: ISA-L's when ``isal`` is installed, else the stdlib's."""
    from medgan.ingest import fastgz

    return fastgz.igzip.decompress if fastgz.available() else gzip.decompress


def decode_rates(path: Path, n_slices: int) -> dict:
    """Bare in-memory gzip decode rate (best of 3; the stdlib's and, when installed, ISA-L's), in slices/s."""
    from medgan.ingest import fastgz

    raw = path.read_bytes()
    out = {}
    decoders = {"stdlib_gzip_slices_per_s": gzip.decompress}
    if fastgz.available():
        decoders["isal_gzip_slices_per_s"] = fastgz.igzip.decompress
    for name, fn in decoders.items():
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            fn(raw)
            best = min(best, time.perf_counter() - t0)
        out[name] = round(n_slices / best, 1)
    return out


def normalize_ms_per_slice(n: int) -> float:
    import torch

    from medgan.config import IngestConfig
    from medgan.ingest.normalize import normalize_volume
    from medgan.ingest.volume import Volume

    torch.set_num_threads(1)
    arr = np.asfortranarray(np.random.default_rng(0).normal(0, 300, (512, 512, n)).astype(np.float32))
    vol = Volume(arr, (0.78, 0.78, 2.5), modality="CT")
    cfg = IngestConfig(min_foreground_fraction=0.0)
    normalize_volume(vol, cfg)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        normalize_volume(vol, cfg)
        times.append(time.perf_counter() - t0)
    return round(float(np.median(times)) / n * 1000, 3)  # median of 5: one run is at the mercy of a noisy VM


def _decode_n(path: str, n: int) -> None:
    raw = Path(path).read_bytes()
    for _ in range(n):
        gzip.decompress(raw)


def machine_scaling(nii: Path, n: int = 6) -> float:
    """2 processes vs 1 on trivially parallel work (gzip decodes, nothing shared): this machine's own ceiling for
    the workers comparison. On a VM whose vCPUs share physical cores it is well below 2."""
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    best = {1: float("inf"), 2: float("inf")}
    for _ in range(2):
        for k in (1, 2):
            procs = [ctx.Process(target=_decode_n, args=(str(nii), n // k)) for _ in range(k)]
            t0 = time.perf_counter()
            for p in procs:
                p.start()
            for p in procs:
                p.join()
            best[k] = min(best[k], time.perf_counter() - t0)
    return round(best[1] / best[2], 2)


def _best_rates(manifest: Path, tmp: Path, rounds: int, variants: dict) -> tuple[dict, dict]:
    """`run_ingest` of the manifest under each variant (name -> extra ``--set`` values), interleaved round by round:
    (the best slices/s of each, its work-item count). Best of the rounds: other tenants only slow a run down."""
    from medgan.config import load_config
    from medgan.ingest import run_ingest

    best, items = dict.fromkeys(variants, 0.0), {}
    for _ in range(rounds):
        for name, sets in variants.items():
            cfg = load_config(sets=["ingest.min_foreground_fraction=0", *sets])
            shutil.rmtree(tmp / f"ds-{name}", ignore_errors=True)
            t0 = time.perf_counter()
            rep = run_ingest(cfg, tmp / f"ds-{name}", manifest=manifest, key_file=tmp / "key" / "k", progress=False)
            best[name] = max(best[name], rep.n_slices / (time.perf_counter() - t0))
            items[name] = rep.n_items
    return best, items


def gunzip_ab(manifest: Path, tmp: Path, rounds: int) -> dict:
    """`run_ingest` of the manifest with one worker, ``ingest.fast_gunzip`` false (nibabel's own gzip) and true
    (ISA-L), interleaved: best of each and the speedup."""
    from medgan.ingest import fastgz

    if not fastgz.available():
        return {"not_measured": "isal is not installed"}
    one = "ingest.workers=1"
    best, _ = _best_rates(manifest, tmp, rounds, {"stdlib": [one, "ingest.fast_gunzip=false"], "isal": [one]})
    return {
        **{f"{k}_slices_per_s": round(v, 1) for k, v in best.items()},
        "speedup": round(best["isal"] / best["stdlib"], 2),
    }


def _one_vs_two(manifest: Path, tmp: Path, rounds: int) -> dict:
    """run_ingest with 1 and 2 workers, interleaved 1, 2, 1, 2: best of each."""
    best, items = _best_rates(manifest, tmp, rounds, {w: [f"ingest.workers={w}"] for w in (1, 2)})
    out = {f"workers_{w}_slices_per_s": round(best[w], 1) for w in (1, 2)}
    out["work_items_1_2"] = [items[1], items[2]]
    out["speedup_2_vs_1"] = round(best[2] / best[1], 2)
    return out


def workers_scaling(nii: Path, tmp: Path, copies: int, rounds: int = 3) -> dict:
    """12 .nii.gz volumes, one manifest row each: the usual case."""
    for i in range(copies):
        link = tmp / f"copy{i}.nii.gz"
        if not link.exists():
            os.link(nii, link)  # a hard link: one file under distinct paths (ingest refuses a row repeating a path)
    manifest = tmp / "m.csv"
    manifest.write_text("source,label,modality\n" + "".join(f"copy{i}.nii.gz,ct,CT\n" for i in range(copies)))
    out: dict = {"volumes": copies, "rounds": rounds, **_one_vs_two(manifest, tmp, rounds)}
    out["fast_gunzip_one_worker"] = gunzip_ab(manifest, tmp, rounds)
    out["machine_ceiling_2_vs_1"] = machine_scaling(nii)
    return out


def archive_scaling(tmp: Path, n_series: int, n_slices: int, rounds: int = 3) -> dict:
    """One manifest row naming a folder of `n_series` DICOM series folders (an archive export), against the same
    series as one row each: ingest reads the big row as one work item per sub-folder, so 2 workers share it as they
    share many rows."""
    archive = tmp / "archive"
    for i in range(n_series):
        if not (archive / f"series{i:02d}").is_dir():
            write_dicom_series(archive / f"series{i:02d}", n_slices)  # new UIDs each: distinct series
    one, many = tmp / "archive.csv", tmp / "series.csv"
    one.write_text("source,label,modality\narchive,ct,CT\n")
    many.write_text("source,label,modality\n" + "".join(f"archive/series{i:02d},ct,CT\n" for i in range(n_series)))
    out = {"series": n_series, "slices_per_series": n_slices, "rounds": rounds}
    return {**out, "one_row": _one_vs_two(one, tmp, rounds), "one_row_per_series": _one_vs_two(many, tmp, rounds)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (a functional check, not a measurement)")
    ap.add_argument("--dicom-slices", type=int, default=100)
    ap.add_argument("--nifti-slices", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5, help="runs per process: 1 cold + warm ones (median reported)")
    ap.add_argument("--rounds", type=int, default=3, help="medgan and MONAI processes alternated this many times")
    ap.add_argument("--volumes", type=int, default=12, help="volumes for the 1 vs 2 workers comparison")
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default benchmarks/results/cpu.json)")
    args = ap.parse_args()
    n_dcm, n_nii, copies = (16, 24, 2) if args.quick else (args.dicom_slices, args.nifti_slices, args.volumes)
    repeats, rounds = (2, 1) if args.quick else (max(2, args.repeats), max(1, args.rounds))
    out_path = args.out or ROOT / "benchmarks" / "results" / "cpu.json"

    results: dict = {
        "cpu_count": os.cpu_count(),
        "host": socket.gethostname().split(".")[0],
        "python": platform.python_version(),
        "quick": args.quick,
        "repeats": repeats,
        "rounds": rounds,
        "inputs": {},
    }
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        inputs = {
            "dicom_uncompressed": ("dicom", write_dicom_series(tmp / "dcm", n_dcm)),
            "dicom_rle": ("dicom", write_dicom_series(tmp / "rle", n_dcm, syntax="1.2.840.10008.1.2.5")),
            "nifti_gz": ("nifti", write_nifti(tmp / "vol.nii.gz", n_nii)),
        }
        j2k = SHARED / "dicom" / "ct_totalsegmentator_j2k_20slices" / "series"
        if j2k.is_dir():
            inputs["dicom_jpeg2000"] = ("dicom", j2k)
        for name, (kind, path) in inputs.items():
            m, b, ratios = measure_pair(kind, path, repeats, rounds)
            row = {
                "medgan": m,
                "monai_baseline": b,
                "speedup_vs_monai": round(float(np.median(ratios)), 2),
                "speedup_per_round": [round(r, 2) for r in ratios],
            }
            if name == "nifti_gz":
                row["bare_decode"] = decode_rates(path, n_nii)
                row["reference_decoder"] = "isal" if "isal_gzip_slices_per_s" in row["bare_decode"] else "stdlib"
                ref = row["bare_decode"].get("isal_gzip_slices_per_s", row["bare_decode"]["stdlib_gzip_slices_per_s"])
                row["fraction_of_bare_decode_unpaired"] = round(m["slices_per_s"] / ref, 2)
                row["fraction_of_bare_stdlib_decode"] = round(
                    m["slices_per_s"] / row["bare_decode"]["stdlib_gzip_slices_per_s"], 2
                )
                # The headline: each warm run against a bare decode timed right after it, so both see one machine.
                row["fraction_of_bare_decode"] = m.get("paired_fraction_of_floor")
            if kind == "dicom" and name == "dicom_uncompressed":
                row["pydicom_header_parse_per_s"] = header_rate(path)
                row["fraction_of_header_parse"] = m.get("paired_fraction_of_floor")
            results["inputs"][name] = row
            frac = m.get("paired_fraction_of_floor")
            floor = f", {frac:.2f} of the bare floor" if frac is not None else ""
            print(
                f"{name:20s} medgan {m['slices_per_s']:8.1f} slices/s"
                f" (cold {m['cold_slices_per_s']}, {m['peak_mb']} MB{floor})"
                f"   monai {b['slices_per_s']:8.1f} slices/s (cold {b['cold_slices_per_s']}, {b['peak_mb']} MB)"
                f"   x{row['speedup_vs_monai']} (rounds: {', '.join(map(str, row['speedup_per_round']))})"
            )
        results["normalize_resize_ms_per_slice"] = normalize_ms_per_slice(min(n_nii, 64))
        print(f"normalize + antialiased resize: {results['normalize_resize_ms_per_slice']} ms/slice/core")
        results["workers"] = workers_scaling(inputs["nifti_gz"][1], tmp, copies)
        print(f"run_ingest workers: {results['workers']}")
        results["workers_one_archive_row"] = archive_scaling(tmp, *((2, 8) if args.quick else (8, 100)))
        print(f"run_ingest workers, one row of series folders: {results['workers_one_archive_row']}")

    data = json.loads(out_path.read_text()) if out_path.is_file() else {}
    data["ingest"] = results
    from medgan.io import atomic_write_json

    atomic_write_json(out_path, data)
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
