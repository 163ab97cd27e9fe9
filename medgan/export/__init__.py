"""medgan export: a generator -> images by (class, seed) -> PNG/NPY/NIfTI/DICOM files, a slice dataset and manifests.

An export folder holds

```
<out>/dataset.json, slices.npy, slices.csv, report.csv   the slice dataset (synthetic: true, generator lineage)
<out>/images/<class>/<index>.<ext>                       one file per image in the chosen format
<out>/datalist.json                                      MONAI decathlon datalist {"training": [{"image", "label"}]}
<out>/manifest.csv                                       row, file, class_name, label, seed
<out>/README.md                                          SYNTHETIC banner, provenance, intensity mapping
```

Image ``index`` of class ``label`` is generated from seed ``export.seed + label * 1_000_000 + index``
(`medgan.sampling`, the rule `medgan evaluate` uses too), so a class's images do not depend on which other classes are
exported, and an evaluation with the same seed and batch size scores exactly these images. The same model, seed,
batch size and device give byte-identical files (DICOM: identical pixels; UIDs are fresh per export). Batches never
mix classes because kernels may round differently for another batch shape (last-bit float32 differences). Every row
goes to split ``export.split`` (default ``train``) so `medgan train` and `medgan evaluate` read the export like real
data.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medgan.config import Config, to_dict
from medgan.export.folder import STAGING, check_out
from medgan.export.formats import EXTENSIONS, FORMATS, QUANTIZATION, encode, read_image
from medgan.io import atomic_dir, atomic_write_json, atomic_write_text
from medgan.sampling import SEED_STRIDE, image_seed  # the one seed rule, shared with medgan evaluate

if TYPE_CHECKING:
    from medgan.export.confidence import ConfidenceFilter
    from medgan.models.generator import LoadedGenerator

__all__ = ["ExportResult", "export_dataset", "image_seed", "read_image", "run_export", "SEED_STRIDE"]

RESOLUTION = 128


@dataclass
class ExportResult:
    """What an export wrote.

    Attributes:
        out: the export folder.
        n_images: images written.
        format: png | npy | nifti | dicom.
        counts: images per exported class name.
        device: where the generator ran.
        seconds: wall time of the whole export; ``generate_seconds`` of it was spent in the generator.
        meta: the ``dataset.json`` content.
    """

    out: Path
    n_images: int
    format: str
    counts: dict[str, int]
    device: str
    seconds: float
    generate_seconds: float
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        return self.n_images / self.seconds if self.seconds > 0 else float("inf")

    def summary(self) -> str:
        from medgan.export.manifests import filter_lines

        gen = self.meta.get("generator", {})
        lines = [
            f"exported {self.n_images} SYNTHETIC images ({self.format}) to {self.out}",
            "  per class: " + ", ".join(f"{k}={v}" for k, v in self.counts.items()),
            f"  model: {gen.get('model_uri') or gen.get('checkpoint') or 'unknown'}",
            *filter_lines(self.meta.get("export", {}).get("class_confidence_filter")),
            f"  {self.seconds:.1f} s ({self.images_per_s:.1f} images/s, generator {self.generate_seconds:.1f} s "
            f"on {self.device})",
            f"  read with: SliceDataset.open({str(self.out)!r}) or monai.data.load_decathlon_datalist"
            f"({str(self.out / 'datalist.json')!r})",
        ]
        return "\n".join(lines)


def run_export(
    cfg: Config,
    model_ref: str,
    out: Path,
    *,
    classes: list[str] | None = None,
    force: bool = False,
    data: Path | None = None,
) -> ExportResult:
    """Export a synthetic dataset from a registered model, a run or a checkpoint (what ``medgan export`` runs).

    Args:
        cfg: the resolved config; ``cfg.export`` says how many, which format and seed, ``cfg.track.tracking_uri``
            where ``models:/`` and ``runs:/`` references resolve.
        model_ref: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/RUN_ID``, a run id or a checkpoint file.
        out: the folder to create.
        classes: class names to export (default: all the model's classes).
        force: replace an earlier medgan export at `out` (nothing else: see `export_dataset`).
        data: the real slice dataset the generator learned from; needed by ``export.min_class_confidence`` (its
            train split trains the domain classifier that judges each sample, `medgan.export.confidence`).

    Returns:
        The `ExportResult`.

    Raises:
        ValueError: a bad option, or a class the model does not know (the message lists the valid ones).
        FileExistsError: `out` is not empty and `force` is false, or `out` is not an earlier medgan export.

    Example:
        >>> result = run_export(load_config(), "models:/medgan-demo@champion", Path("synthetic/demo"))
        >>> print(result.summary())
    """
    from medgan.tracking.registry import load_generator

    check_out(Path(out), force)  # before loading a model: a refused --out costs nothing
    loaded = load_generator(model_ref, cfg.track.tracking_uri)
    loaded.info.setdefault("model_ref", model_ref)
    confidence = None
    if cfg.export.min_class_confidence:
        from medgan.export.confidence import domain_filter

        confidence = domain_filter(cfg, loaded, data)
    return export_dataset(loaded, cfg, Path(out), classes=classes, force=force, progress=True, confidence=confidence)


def _check_options(cfg: Config) -> None:
    from medgan.dataset import SPLITS

    e = cfg.export
    if e.format not in FORMATS:
        raise ValueError(f"export.format {e.format!r} is not one of {FORMATS}; e.g. --format png")
    if e.format == "png" and e.png_bits not in (8, 16):
        raise ValueError(f"export.png_bits is {e.png_bits}; use 8 or 16 (--set export.png_bits=16)")
    if not 1 <= e.n_per_class < SEED_STRIDE:
        raise ValueError(f"--n-per-class is {e.n_per_class}; it must be between 1 and {SEED_STRIDE - 1}")
    if e.batch_size < 1:
        raise ValueError(f"export.batch_size is {e.batch_size}; it must be >= 1")
    if e.split not in SPLITS:
        raise ValueError(f"export.split {e.split!r} is not one of {SPLITS}")
    if e.spacing_mm < 0:
        raise ValueError(f"export.spacing_mm is {e.spacing_mm}; use a positive spacing or 0 (from the training data)")


def _select_classes(all_classes: list[str], classes: list[str] | None) -> list[int]:
    if classes is None:
        return list(range(len(all_classes)))
    wanted = list(dict.fromkeys(c.strip() for c in classes if c.strip()))
    unknown = [c for c in wanted if c not in all_classes]
    if unknown or not wanted:
        what = f"unknown class(es) {unknown}" if unknown else "no class names given"
        raise ValueError(f"--classes: {what}; this generator knows {all_classes} (comma-separated names)")
    return [all_classes.index(c) for c in wanted]


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"export.device is {name!r} but CUDA is not available; use cpu or auto")
    return name


def _spacing(cfg: Config, info: dict[str, Any]) -> tuple[float, str]:
    if cfg.export.spacing_mm > 0:
        return float(cfg.export.spacing_mm), "export.spacing_mm"
    known = info.get("spacing_mm")
    with contextlib.suppress(TypeError, ValueError):
        value = float(np.median(np.asarray(known, dtype=np.float64)))
        if value > 0 and np.isfinite(value):
            return value, "training dataset"
    return 1.0, "default (training spacing unknown)"


def _folder_names(classes: list[str]) -> dict[int, str]:
    # Class names become folder names: keep them readable, make them safe and unique.
    out: dict[int, str] = {}
    for i, c in enumerate(classes):
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", c).strip("._") or f"class{i}"
        out[i] = name if name not in out.values() else f"{name}_{i}"
    return out


def _plain(info: dict[str, Any]) -> dict[str, Any]:
    ok = (str, int, float, bool, type(None), list, dict)
    return {str(k): (v if isinstance(v, ok) else str(v)) for k, v in info.items()}


def export_dataset(
    loaded: LoadedGenerator,
    cfg: Config,
    out: Path,
    *,
    classes: list[str] | None = None,
    force: bool = False,
    progress: bool = True,
    confidence: ConfidenceFilter | None = None,
) -> ExportResult:
    """Generate `cfg.export.n_per_class` images per class and write them as an export folder (see module docstring).

    Args:
        loaded: a `medgan.models.generator.LoadedGenerator` (generator, class names, provenance ``info``).
        cfg: the resolved config (``cfg.export`` fields: format, n_per_class, seed, batch_size, png_bits, split,
            spacing_mm, device, workers).
        out: the folder to create; built in ``<out>.partial`` and renamed when complete.
        classes: class names to export (default: all); labels keep the model's indices.
        force: replace a non-empty `out`, but only an earlier medgan export: a folder whose ``dataset.json`` says
            ``synthetic: true`` with export details, holding only the files an export writes (its ``manifest.csv``
            lists every image). A real dataset, or any file medgan did not write, is refused and left as it is.
        progress: show a tqdm bar.
        confidence: keep only samples this filter accepts (``--min-class-confidence``), drawing more seeds per class.

    Returns:
        The `ExportResult`.

    Raises:
        ValueError: a bad option or unknown class (the message lists the valid values).
        FileExistsError: `out` is not empty and `force` is false, or `out` is not an earlier medgan export.

    Example:
        >>> loaded = medgan.tracking.registry.load_generator("runs/x/ckpt-000120000.pt")
        >>> export_dataset(loaded, cfg, Path("synthetic/x"), classes=["tumor"]).n_images
        100
    """
    import torch
    from tqdm import tqdm

    from medgan.dataset import write_dataset
    from medgan.export import dicom, manifests
    from medgan.models.generator import generate

    t0 = time.perf_counter()
    e, out = cfg.export, Path(out)
    _check_options(cfg)
    labels_wanted = _select_classes(loaded.classes, classes)
    check_out(out, force)
    device = _device(e.device)
    spacing_mm, spacing_source = _spacing(cfg, loaded.info)
    info = _plain(loaded.info)
    model_uri = str(info.get("model_uri") or info.get("model_ref") or info.get("checkpoint") or "")

    # The plan: row order is class-major, so rows, files, manifest and datalist line up one to one.
    folders, ext = _folder_names(loaded.classes), EXTENSIONS[e.format]
    width = max(5, len(str(e.n_per_class - 1)))
    plan_labels = np.repeat(np.asarray(labels_wanted, dtype=np.int64), e.n_per_class)
    plan_index = np.tile(np.arange(e.n_per_class, dtype=np.int64), len(labels_wanted))
    plan_seeds = np.asarray(
        [image_seed(e.seed, c, i) for c, i in zip(plan_labels, plan_index, strict=True)], dtype=np.int64
    )
    files = [
        f"images/{folders[c]}/{i:0{width}d}.{ext}"
        for c, i in zip(plan_labels.tolist(), plan_index.tolist(), strict=True)
    ]
    n = len(files)

    study_uid = ""
    series: dict[int, dicom.Series] = {}
    if e.format == "dicom":
        from pydicom.uid import generate_uid

        study_uid = generate_uid()
        series = {c: dicom.new_series(study_uid, loaded.classes[c], c, model_uri, spacing_mm) for c in labels_wanted}

    def write_one(path: Path, image: np.ndarray, label: int, index: int, seed: int) -> None:
        if e.format == "dicom":
            data = dicom.dicom_bytes(image, series[label], index + 1, seed)
        else:
            data = encode(e.format, image, png_bits=e.png_bits, spacing_mm=spacing_mm)
        path.write_bytes(data)  # plain write: the whole folder becomes visible atomically

    # A stale partial from an interrupted export (checked by `check_out`) is not resumable: start clean.
    shutil.rmtree(out.with_name(out.name + ".partial"), ignore_errors=True)
    G = loaded.G if device == "cpu" else copy.deepcopy(loaded.G).to(device)
    accepted, confidences, filter_record = None, None, None
    if confidence is not None:  # the filter picks each class's seeds, and has drawn their images already
        from medgan.export.confidence import draw_confident

        accepted, plan_seeds, confidences, filter_record = draw_confident(
            G, loaded.classes, labels_wanted, e.n_per_class, e.seed, confidence, device, e.batch_size
        )
    # cuDNN: no autotuning and deterministic kernels, so a rerun on the same GPU gives the same bits.
    cudnn_det = torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True, allow_tf32=False)
    workers = e.workers or min(8, os.cpu_count() or 1)
    gen_s = 0.0
    with atomic_dir(out, keep_partial=False) as tmp:
        for c in labels_wanted:
            (tmp / "images" / folders[c]).mkdir(parents=True, exist_ok=True)
        # Float16 staging for the slice dataset: streams through disk, so n is bounded by disk, not RAM.
        staging = tmp / STAGING
        stage = np.lib.format.open_memmap(staging, mode="w+", dtype=np.float16, shape=(n, 1, RESOLUTION, RESOLUTION))
        bar = tqdm(total=n, desc=f"export {e.format}", unit="img", disable=not progress)
        with (
            ThreadPoolExecutor(max_workers=workers) as pool,
            cudnn_det if device.startswith("cuda") else contextlib.nullcontext(),
        ):
            pending: list[Future] = []
            # Batches never straddle two classes: kernels may round differently for another batch shape, so a
            # class's pixels must not depend on which other classes are exported.
            starts = [(c0 + i, min(c0 + i + e.batch_size, c0 + e.n_per_class))
                      for c0 in range(0, n, e.n_per_class) for i in range(0, e.n_per_class, e.batch_size)]  # fmt: skip
            for start, stop in starts:
                tg = time.perf_counter()
                images = (
                    accepted[start:stop]
                    if accepted is not None
                    else generate(G, plan_labels[start:stop], plan_seeds[start:stop], device, e.batch_size)
                )
                gen_s += time.perf_counter() - tg
                assert images.shape == (stop - start, 1, RESOLUTION, RESOLUTION), images.shape
                stage[start:stop] = images
                # At most two batches in flight: the GPU makes batch k+1 while threads write batch k.
                for f in pending:
                    f.result()
                pending = []
                for k in range(start, stop):
                    f = pool.submit(
                        write_one, tmp / files[k], images[k - start], int(plan_labels[k]), int(plan_index[k]),
                        int(plan_seeds[k]),
                    )  # fmt: skip
                    f.add_done_callback(lambda _: bar.update(1))
                    pending.append(f)
            for f in pending:
                f.result()
        bar.close()
        stage.flush()

        rows = [
            {
                "split": e.split, "label": int(c), "class_name": loaded.classes[c], "patient": "",
                "volume": "synthetic", "slice_index": int(i), "position_mm": "", "spacing_mm": spacing_mm,
                "modality": str(info.get("modality") or "OT"), "seed": int(s),
            }
            for c, i, s in zip(plan_labels.tolist(), plan_index.tolist(), plan_seeds.tolist(), strict=True)
        ]  # fmt: skip
        export_info = {
            "format": e.format,
            "png_bits": e.png_bits if e.format == "png" else None,
            "files": f"images/<class>/<index>.{ext}",
            "classes_exported": [loaded.classes[c] for c in labels_wanted],
            "class_folders": {loaded.classes[c]: folders[c] for c in labels_wanted},
            "n_per_class": e.n_per_class,
            "seed": e.seed,
            "seed_rule": f"seed + label * {SEED_STRIDE} + index",
            "batch_size": e.batch_size,
            "device": device,
            "intensity_mapping": manifests.mapping_text(e.format, e.png_bits),
            "max_quantization_error": QUANTIZATION["png" + str(e.png_bits) if e.format == "png" else e.format],
            "spacing_mm": spacing_mm,
            "spacing_source": spacing_source,
            "dicom_study_uid": study_uid or None,
            "dicom_series_uids": {loaded.classes[c]: s.series_uid for c, s in series.items()} or None,
            "class_confidence_filter": filter_record,
        }
        meta = {
            "name": out.name,
            "synthetic": True,
            "synthetic_notice": dicom.SYNTHETIC_MARKER,
            "generator": info,
            "source_dataset_hash": info.get("dataset_hash"),
            "export": export_info,
            "normalization": {"method": "generated", "value_range": [-1, 1]},
            # The export's resolved config, with the model section the generator was actually built from.
            "config": {**to_dict(cfg), "model": to_dict(loaded.model_cfg)},
        }
        # Our folder is already atomic: the dataset's files go straight into it.
        ds_meta = write_dataset(tmp, stage, rows, loaded.classes, meta=meta, atomic=False)
        del stage
        staging.unlink()

        labels_list, seeds_list = plan_labels.tolist(), plan_seeds.tolist()
        conf = confidences.tolist() if confidences is not None else None
        atomic_write_text(
            tmp / "manifest.csv", manifests.manifest_csv(loaded.classes, files, labels_list, seeds_list, conf)
        )
        atomic_write_json(
            tmp / "datalist.json", manifests.datalist(out.name, loaded.classes, files, labels_list, seeds_list, conf)
        )
        atomic_write_text(tmp / "README.md", manifests.readme(ds_meta))

    counts = {loaded.classes[c]: e.n_per_class for c in labels_wanted}
    return ExportResult(out, n, e.format, counts, device, time.perf_counter() - t0, gen_s, ds_meta)
