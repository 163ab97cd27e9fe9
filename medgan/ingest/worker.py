"""One ingest work item (a volume source, or a chunk of 2-D images): read, normalize, write a resumable part file.

Runs inside pool processes. A part is ``<id>.npy`` (images, float16 [n, 1, R, R], range-checked) and ``<id>.json``
(per-source report rows, per-slice rows with pseudonymous keys only, and each slice's SHA-256), each written atomically,
the JSON last: a part whose JSON exists is complete, and its digests tell whether its images are still intact.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medgan.config import IngestConfig, to_dict
from medgan.dataset import checked_float16, image_digests
from medgan.ingest.image2d import read_image2d
from medgan.ingest.manifest import Source
from medgan.ingest.nifti import read_mask, read_nifti
from medgan.ingest.normalize import Slices, normalize_image2d, normalize_volume
from medgan.ingest.privacy import Pseudonymizer, Redactor, perceptual_hash
from medgan.ingest.store import part_intact
from medgan.ingest.volume import Volume
from medgan.io import atomic_write_json, atomic_write_npy, read_json

# 5: report rows name their source (redacted); 4: series parts; 3: per-slice digests; 2: .npy + .json; 1: .npz
PART_VERSION = 5
# Config fields that change what a part holds; workers/splits/seed only affect scheduling and assembly.
_ASSEMBLY_ONLY = (
    "workers",
    "split_fractions",
    "seed",
    "images_per_part",
    "dedup_max_distance",
    "split_folder_rows",
    "fast_gunzip",  # the same voxels either way
)


@dataclass
class Task:
    """A work item: its sources, what to do with them, and where its part goes."""

    sources: list[Source]
    cfg: IngestConfig
    key: bytes
    root: Path
    parts_dir: Path
    part_id: str
    size: int = 0  # bytes of its sources: largest first keeps a worker from starting a big volume last


def _stats(path: Path | None) -> tuple[list[str], int]:
    """Size and mtime of a file, or of every file under a folder (sorted): what a part's freshness depends on; and
    the total size in bytes."""
    if path is None:
        return [], 0
    if path.is_file():
        st = path.stat()
        return [f"{st.st_size}:{st.st_mtime_ns}"], st.st_size
    out, total = [], 0
    for dirpath, dirnames, files in os.walk(path):
        dirnames.sort()
        for f in sorted(files):
            full = os.path.join(dirpath, f)
            try:
                st = os.stat(full)
            except OSError:  # a dangling symlink or a loop: skipped when read; its own state is what counts
                st = os.lstat(full)
            out.append(f"{os.path.relpath(full, path)}:{st.st_size}:{st.st_mtime_ns}")
            total += st.st_size if stat.S_ISREG(st.st_mode) else 0
    return out, total


def part_id(sources: list[Source], cfg: IngestConfig, key_fingerprint: str) -> tuple[str, int]:
    """A stable id for a work item (its rows, the files' sizes and mtimes, the relevant config and the key id), and
    the bytes its sources hold: the scheduler's estimate of its work."""
    conf = {k: v for k, v in to_dict(cfg).items() if k not in _ASSEMBLY_ONLY}
    h = hashlib.sha256(f"medgan-part/{PART_VERSION}/{key_fingerprint}/".encode())
    h.update(json.dumps(conf, sort_keys=True).encode())
    total = 0
    for s in sources:
        fields = [s.row, s.rel, s.part, s.kind, s.label, s.modality, s.window, str(s.mask is not None)]
        (files, size), (mask_files, _) = _stats(s.path), _stats(s.mask)
        h.update(json.dumps([fields, files, mask_files]).encode())
        total += size
    return h.hexdigest()[:24], total


def _reason(e: BaseException, src: Source, root: Path, redact: Redactor) -> str:
    """One line, paths relative to the root and identifiers replaced (never an absolute path or a UID in a report).
    A file's own name in the message (nibabel's, or ours) is shown as its redacted relative path."""
    msg = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
    shown = shown_path(src, redact)
    for p, rel in ((src.path.resolve(), shown), (src.path, shown), (root.resolve(), "<root>"), (root, "<root>")):
        msg = msg.replace(str(p), rel)
    # A sub-folder's own name (read from disk, not typed in the manifest) is never shown, not even redacted.
    for name in ("" if src.part else src.path.name, src.mask.name if src.mask is not None else ""):
        if name and name not in shown:
            msg = msg.replace(name, redact.path(name))
    return " ".join(redact.text(msg).split())[:300]


def shown_path(src: Source, redact: Redactor) -> str:
    """How outputs name a source: its redacted path, and for a row read per sub-folder the sub-folder's number."""
    return redact.path(src.rel) + (f" [sub-folder {src.part}/{src.parts}]" if src.part else "")


def _label_from_tags(tags: dict[str, str], cfg: IngestConfig) -> str:
    value = tags.get(cfg.dicom_label_tag, "").strip()
    if not value:
        raise ValueError(f"series has no {cfg.dicom_label_tag} value to take its class from (ingest.dicom_label_tag)")
    if cfg.dicom_label_map:
        if value not in cfg.dicom_label_map:
            raise ValueError(f"the series' {cfg.dicom_label_tag} value is not a key of ingest.dicom_label_map")
        return cfg.dicom_label_map[value]
    return value


def _volumes(
    src: Source, cfg: IngestConfig, pseudonym: Callable[[str], str], notes: list[str], ids: set[str], root: Path
):
    """Yield (volume, label) for a source; a DICOM folder may hold several series. The identifying header values of
    the files read are added to `ids` (before anything is reported)."""
    if src.kind == "nifti":
        vol = read_nifti(
            src.path,
            volume_index=cfg.volume_index,
            modality=src.modality,
            max_volume_mb=cfg.max_volume_mb,
            fast_gunzip=cfg.fast_gunzip,
        )
        vol.volume = pseudonym("volume:" + src.rel)
        yield vol, src.label
        return
    from medgan.ingest import dicom

    series, skips = dicom.discover_series(src.path, cfg.min_series_slices, root=root, max_volume_mb=cfg.max_volume_mb)
    for s in [*series, *skips]:
        ids |= s.identifiers
    notes.extend(discovery_notes(skips))
    if not series:
        raise ValueError(no_series_reason(skips))
    for i, s in enumerate(series):
        try:
            label = src.label or (_label_from_tags(s.label_tags, cfg) if cfg.dicom_label_tag else "")
            vol = dicom.read_series(s, pseudonym)
        except Exception as e:  # one bad series does not sink the others
            notes.append(f"series {i + 1}/{len(series)} skipped: {e}")
            continue
        if src.modality:
            vol.modality = src.modality
        vol.volume = vol.volume or pseudonym(f"volume:{src.rel}#{s.key}")
        yield vol, label


def discovery_notes(skips: list) -> list[str]:
    """The note a DICOM source's report carries about files and series that discovery did not use."""
    return [f"{len(skips)} file(s) not used ({_summarize(s.reason for s in skips)})"] if skips else []


def no_series_reason(skips: list) -> str:
    """Why a DICOM source gave no series."""
    return "no DICOM image series found" + (f": {_summarize(s.reason for s in skips)}" if skips else "")


def source_report(row: int, n_slices: int, notes: list[str], error: str | None = None) -> dict[str, Any]:
    """A source's report row from its slices and notes (or the error that stopped it)."""
    if error is not None:
        status, reason = "skipped", error
    elif n_slices:
        status, reason = "ok", "; ".join(dict.fromkeys(notes))
    elif notes:
        status, reason = "skipped", "no usable slices: " + "; ".join(dict.fromkeys(notes))
    else:
        status, reason = "skipped", "no slice passed selection (ingest.min_foreground_fraction / mask classes)"
    n = n_slices if status == "ok" else 0
    return {"row": row, "status": status, "reason": " ".join(reason.split())[:300], "n_slices": n}


def _summarize(reasons) -> str:
    """The three most common reasons, counted."""
    return "; ".join(f"{n}x {r}" if n > 1 else r for r, n in Counter(reasons).most_common(3))


def _slice_rows(src: Source, vol: Volume, sl: Slices, label: str) -> list[dict[str, Any]]:
    names = sl.classes if sl.classes is not None else [label] * len(sl.slice_index)
    return [
        {
            "row": src.row,
            "volume": vol.volume,
            "patient": vol.patient,
            "class_name": c,
            "slice_index": int(i),
            "position_mm": round(float(p), 4),
            "spacing_mm": round(float(sl.spacing_mm), 6),
            "modality": vol.modality,
            "phash": "",
        }
        for i, p, c in zip(sl.slice_index, sl.position_mm, names, strict=True)
    ]


def process_source(src: Source, cfg: IngestConfig, pseudonym: Callable[[str], str], root: Path):
    """Read and normalize one source.

    Returns:
        (float16 image arrays, slice rows, the report row, normalization descriptions). The report row's ``source`` is
        the source's path with identifiers replaced (`privacy.Redactor`: UID-shaped components, and the PatientID,
        names and UIDs of the files read), and its reason is scrubbed the same way.
    """
    ids = {src.patient} if src.patient else set()
    images: list[np.ndarray] = []
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    used: set[str] = set()
    allowed = set(cfg.classes)
    error = None
    try:
        if src.kind == "image2d":
            img, fg = normalize_image2d(read_image2d(src.path), cfg)
            if fg < cfg.min_foreground_fraction:
                raise ValueError(f"near-empty image: foreground {fg:.3f} < ingest.min_foreground_fraction")
            images.append(img)
            rows.append(
                {
                    "row": src.row,
                    "volume": pseudonym("volume:" + src.rel),
                    "patient": "",
                    "class_name": src.label,
                    "slice_index": 0,
                    "position_mm": 0.0,
                    "spacing_mm": 0.0,
                    "modality": src.modality or "OT",
                    "phash": perceptual_hash(img[0, 0]).astype(">u8").tobytes().hex(),
                }
            )
            used.add(f"2-D {cfg.image_normalization}")
        else:
            mask = read_mask(src.mask, cfg.max_volume_mb, cfg.fast_gunzip) if src.mask is not None else None
            for vol, label in _volumes(src, cfg, pseudonym, notes, ids, root):
                try:  # one bad series (or a mask that does not fit it) does not sink the others
                    if mask is not None and mask.shape != vol.shape:
                        raise ValueError(
                            f"wrong-shaped mask: {tuple(mask.shape)} vs image {tuple(vol.shape)} "
                            "(after canonical orientation); the mask must share the image's voxel grid"
                        )
                    sl = normalize_volume(vol, cfg, window=src.window, mask=mask)
                    names = sl.classes or [label] * len(sl.slice_index)
                    keep = [i for i, c in enumerate(names) if not allowed or c in allowed]
                    if len(keep) < len(sl.slice_index):
                        notes.append(f"{len(sl.slice_index) - len(keep)} slice(s) with classes outside ingest.classes")
                        sl.images, sl.slice_index = sl.images[keep], [sl.slice_index[i] for i in keep]
                        sl.position_mm = [sl.position_mm[i] for i in keep]
                        sl.classes = [sl.classes[i] for i in keep] if sl.classes is not None else None
                    notes.extend(vol.notes)
                    if len(sl.slice_index) < sl.n_total:
                        notes.append(f"{len(sl.slice_index)}/{sl.n_total} slices kept")
                    images.append(sl.images)
                    rows.extend(_slice_rows(src, vol, sl, label))
                    used.add(sl.normalization)
                except Exception as e:
                    notes.append(f"a series was skipped: {e}")
    except MemoryError:
        error = "not enough memory to read it (lower ingest.max_volume_mb or use fewer ingest.workers)"
    except Exception as e:  # a bad source is reported and the rest goes on
        error = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
    redact = Redactor(pseudonym, ids)
    notes = [_reason(ValueError(n), src, root, redact) for n in notes]
    error = _reason(ValueError(error), src, root, redact) if error is not None else None
    report = source_report(src.row, len(rows), notes, error)
    report["source"] = redact.path(src.rel)
    report["ids"] = sorted(redact.hashed)  # keyed hashes: the parent redacts every row with every source's ids
    if report["status"] != "ok":
        images, rows, used = [], [], set()
    return images, rows, report, used


def run_task(task: Task) -> dict[str, Any]:
    """Process a work item and write its part atomically; returns a small summary for the parent."""
    pseudonym = Pseudonymizer(task.key)
    images: list[np.ndarray] = []
    rows: list[dict[str, Any]] = []
    reports: list[dict[str, Any]] = []
    used: set[str] = set()
    with _single_threaded():
        for src in task.sources:
            im, r, rep, u = process_source(src, task.cfg, pseudonym, task.root)
            images.extend(im)
            rows.extend(r)
            reports.append(rep)
            used |= u
    write_part(task.parts_dir, task.part_id, int(task.cfg.resolution), images, rows, reports, used)
    return {"n_slices": len(rows), "report": reports}


@contextlib.contextmanager
def _single_threaded():
    """torch intra-op threads off inside the block: one process per core, and intra-op threads on small slices only
    spin (70x slower on a busy 2-core machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def write_part(
    parts_dir: Path, pid: str, resolution: int, images: list[np.ndarray], rows: list[dict], reports: list[dict], used
) -> None:
    """Write a part atomically: its images (range-checked) and, last, its JSON with rows, reports and digests."""
    path = parts_dir / f"{pid}.npy"
    arr = np.concatenate(images) if images else np.zeros((0, 1, resolution, resolution), np.float16)
    arr = checked_float16(arr, 0, path)
    # The range check and the per-slice hashes are done here, in parallel, so the parent only copies the bytes.
    meta = {"version": PART_VERSION, "report": reports, "slices": rows, "normalization": sorted(used),
            "digests": image_digests(arr).hex()}  # fmt: skip
    # Pixels first, metadata last: the .json is the part's completion marker (see run_ingest's resume). Neither waits
    # for the disk (no fsync): a part is checked against its digests before it is reused (`reusable`), so one a power
    # cut damaged is made again, and most parts are deleted before the kernel would have written them out at all.
    atomic_write_npy(path, arr, durable=False)
    atomic_write_json(parts_dir / f"{pid}.json", meta, compact=True, durable=False)


def reusable(parts_dir: Path, pid: str) -> bool:
    """Whether an earlier run left this part complete and intact (its images match the digests in its JSON)."""
    meta_path = parts_dir / f"{pid}.json"
    if not meta_path.is_file():
        return False
    try:
        meta = read_json(meta_path)
    except ValueError:
        return False
    if meta.get("version") != PART_VERSION:
        return False
    return not meta["slices"] or part_intact(parts_dir / f"{pid}.npy", bytes.fromhex(meta.get("digests", "")))
