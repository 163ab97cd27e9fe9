"""One ingest work item (a volume source, or a chunk of 2-D images): read, normalize, write a resumable part file.

Runs inside pool processes. A part is ``<id>.npy`` (images, float16 [n, 1, R, R], range-checked) and ``<id>.json``
(per-source report rows, per-slice rows with pseudonymous keys only, and each slice's SHA-256), each written atomically,
the JSON last: a part whose JSON exists is complete, and its digests tell whether its images are still intact.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medgan.config import IngestConfig, to_dict
from medgan.dataset import checked_float16, image_digests
from medgan.ingest.image2d import read_image2d
from medgan.ingest.manifest import Source
from medgan.ingest.nifti import open_volume, read_mask
from medgan.ingest.normalize import Slices, normalize_image2d, normalize_volume
from medgan.ingest.privacy import Pseudonymizer, perceptual_hash
from medgan.ingest.store import part_intact
from medgan.ingest.volume import ReadError, Volume, VolumeStream
from medgan.io import atomic_write_json, atomic_write_npy, read_json

# 4: a series part holds no notes of its source; 3: per-slice digests in the .json; 2: <id>.npy + <id>.json; 1: .npz
PART_VERSION = 4
# Config fields that change what a part holds; workers/splits/seed only affect scheduling and assembly.
_ASSEMBLY_ONLY = ("workers", "split_fractions", "seed", "images_per_part", "dedup_max_distance", "dicom_scan_files")


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
    series: SeriesPlan | None = None  # one series of its (single, DICOM) source: see `SeriesPlan`


@dataclass
class SeriesPlan:
    """One series of a DICOM source whose header scan ran over the workers (`run_ingest` does this for a source with
    many files): its work item reads just this series, and the parent merges the source's parts into one report row
    (the source's own notes, on files not used, go straight to that row).

    Attributes:
        key: the series key from the scan of the whole source (it names the volume's pseudonym).
        files: the series' files, in scan order.
        index: its position among the source's series; total: how many there are.
        modality, n_slices, label_tags: as in `SeriesRef`.
        headers: the files' parsed headers when the scan ran in this process (`scan_task`); else they are parsed
            again when the series is read (datasets cost more to send between processes than to parse).
    """

    key: str
    files: list[Path]
    index: int
    total: int
    modality: str = "OT"
    n_slices: int = 0
    label_tags: dict[str, str] = field(default_factory=dict)
    headers: list = field(default_factory=list, repr=False, compare=False)


@dataclass
class ScanTask:
    """A piece of the header scan of a DICOM source with many files (`run_ingest`): files in scan order.

    With `read` (the piece is a whole folder), the worker also reads and normalizes each series it finds wholly in
    the piece and writes its part under the id the series' own work item would have (`series_part_id`), so those
    headers are parsed once. A series with files in other pieces gets another id, and its work item reads it.
    """

    files: list[Path]
    source: Source
    cfg: IngestConfig
    key: bytes
    root: Path
    parts_dir: Path
    part_id: str  # the source's part id
    read: bool


def series_part_id(source_part_id: str, key: str, files: list[Path]) -> str:
    """The part id of one series of a source: the source's part id, the series key and its exact file list (a series
    found in one piece of a scan but with files in others gets a different id than the whole series)."""
    h = hashlib.sha256(f"{source_part_id}/series/{key}/".encode())
    h.update("\n".join(map(str, files)).encode())
    return h.hexdigest()[:24]


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
            st = os.stat(os.path.join(dirpath, f))
            out.append(f"{os.path.relpath(os.path.join(dirpath, f), path)}:{st.st_size}:{st.st_mtime_ns}")
            total += st.st_size
    return out, total


def part_id(sources: list[Source], cfg: IngestConfig, key_fingerprint: str) -> tuple[str, int]:
    """A stable id for a work item (its rows, the files' sizes and mtimes, the relevant config and the key id), and
    the bytes its sources hold: the scheduler's estimate of its work."""
    conf = {k: v for k, v in to_dict(cfg).items() if k not in _ASSEMBLY_ONLY}
    h = hashlib.sha256(f"medgan-part/{PART_VERSION}/{key_fingerprint}/".encode())
    h.update(json.dumps(conf, sort_keys=True).encode())
    total = 0
    for s in sources:
        fields = [s.row, s.rel, s.kind, s.label, s.modality, s.window, str(s.mask is not None)]
        (files, size), (mask_files, _) = _stats(s.path), _stats(s.mask)
        h.update(json.dumps([fields, files, mask_files]).encode())
        total += size
    return h.hexdigest()[:24], total


def _reason(e: BaseException, src: Source, root: Path) -> str:
    """One line, paths relative to the root (never an absolute path in a report)."""
    msg = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
    for p, rel in ((src.path.resolve(), src.rel), (src.path, src.rel), (root.resolve(), "<root>"), (root, "<root>")):
        msg = msg.replace(str(p), rel)
    return " ".join(msg.split())[:300]


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
    src: Source, cfg: IngestConfig, pseudonym: Callable[[str], str], notes: list[str], plan: SeriesPlan | None
):
    """Yield (volume, label) for a source; a DICOM folder may hold several series (or, with `plan`, just one)."""
    if src.kind == "nifti":
        vol = open_volume(src.path, volume_index=cfg.volume_index, modality=src.modality, slice_axis=cfg.slice_axis)
        vol.volume = pseudonym("volume:" + src.rel)
        yield vol, src.label
        return
    from medgan.ingest import dicom

    if plan is None:
        series, skips = dicom.discover_series(src.path, cfg.min_series_slices)
        notes.extend(discovery_notes(skips))
        if not series:
            raise ValueError(no_series_reason(skips))
        numbered, total = list(enumerate(series)), len(series)
    else:
        numbered, total = [(plan.index, plan)], plan.total
    for i, s in numbered:
        try:
            if isinstance(s, SeriesPlan):
                headers = s.headers or dicom.read_headers(s.files)
                s = dicom.SeriesRef(s.key, s.files, s.modality, s.n_slices, s.label_tags, headers)
            label = src.label or (_label_from_tags(s.label_tags, cfg) if cfg.dicom_label_tag else "")
            vol = dicom.read_series(s, pseudonym)
        except Exception as e:  # one bad series does not sink the others
            notes.append(f"series {i + 1}/{total} skipped: {_reason(e, src, src.path)}")
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


def _slice_rows(src: Source, vol: Volume | VolumeStream, sl: Slices, label: str) -> list[dict[str, Any]]:
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


def process_source(
    src: Source, cfg: IngestConfig, pseudonym: Callable[[str], str], root: Path, plan: SeriesPlan | None = None
):
    """Read and normalize one source (with `plan`, one series of it).

    Returns:
        (float16 image arrays, slice rows, the report row, normalization descriptions). With `plan` the report row
        has status ``part``, the raw ``notes`` (the parent merges the source's parts with `source_report`) and
        ``clean``: the series was read and normalized without an error.
    """
    images: list[np.ndarray] = []
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    used: set[str] = set()
    allowed = set(cfg.classes)
    error = None
    n_read = n_failed = 0
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
            mask = read_mask(src.mask) if src.mask is not None else None
            for vol, label in _volumes(src, cfg, pseudonym, notes, plan):
                n_read += 1
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
                except ReadError:  # the source itself is unreadable (found while streaming it): as a failed read
                    raise
                except Exception as e:
                    n_failed += 1
                    notes.append(f"a series was skipped: {_reason(e, src, root)}")
    except Exception as e:  # a bad source is reported and the rest goes on
        error = _reason(e, src, root)
    if plan is not None:
        clean = error is None and n_read == 1 and not n_failed  # no note depends on the series' index
        if error is not None:
            images, rows, used, notes = [], [], set(), [*notes, f"series {plan.index + 1}/{plan.total}: {error}"]
        report = {"row": src.row, "status": "part", "notes": notes, "n_slices": len(rows), "clean": clean}
        return images, rows, report, used
    report = source_report(src.row, len(rows), notes, error)
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
            im, r, rep, u = process_source(src, task.cfg, pseudonym, task.root, task.series)
            rep.pop("clean", None)
            images.extend(im)
            rows.extend(r)
            reports.append(rep)
            used |= u
    write_part(task.parts_dir, task.part_id, int(task.cfg.resolution), images, rows, reports, used)
    return {"n_slices": len(rows), "report": reports}


def scan_task(task: ScanTask) -> dict[str, Any]:
    """Scan a piece of a DICOM source's headers (`ScanTask`); with ``task.read``, also read each series lying wholly
    in the piece into its part, unless an earlier run left that part. A series that fails is left to its own work
    item, which reports it with its place among the source's series.

    Returns:
        {"scanned": the usable files (headers dropped for the trip back), "skips": files not used,
        "parts": id -> True for each part written, False for each intact one an earlier run left,
        "n_slices": slices in the parts written}.
    """
    from medgan.ingest import dicom

    src = task.source
    scanned, skips = dicom.scan_files(task.files, src.path)
    parts: dict[str, bool] = {}
    n_slices = 0
    if task.read:
        pseudonym = Pseudonymizer(task.key)
        series, _ = dicom.group_series(scanned, task.cfg.min_series_slices)
        with _single_threaded():
            for s in series:
                sid = series_part_id(task.part_id, s.key, s.files)
                if reusable(task.parts_dir, sid):
                    parts[sid] = False
                    continue
                plan = SeriesPlan(s.key, s.files, 0, 1, s.modality, s.n_slices, s.label_tags, s.headers)
                images, rows, report, used = process_source(src, task.cfg, pseudonym, task.root, plan)
                if report.pop("clean"):
                    write_part(task.parts_dir, sid, int(task.cfg.resolution), images, rows, [report], used)
                    parts[sid] = True
                    n_slices += len(rows)
    return {"scanned": [f.without_header() for f in scanned], "skips": skips, "parts": parts, "n_slices": n_slices}


@contextlib.contextmanager
def large_buffers_reused():
    """Inside the block, glibc's malloc keeps freed memory for the next allocation instead of unmapping it (processes
    forked inside the block inherit this); on leaving, the defaults come back and the kept memory is released.

    A volume is ~100 MB (the decoded .nii.gz bytes, the stored-value stack); glibc maps each such block afresh and
    unmaps it when freed, so every volume pays a page fault and the kernel zeroing each page before it is written.
    Measured on 12 .nii.gz volumes with `run_ingest` on this 2-core VM: 620-635 -> 830-870 slices/s with one worker,
    1,137-1,235 -> 1,389-1,513 with two; DICOM stacks gain the same way. Elsewhere than glibc (macOS, Windows, musl)
    this does nothing.
    """
    libc = _glibc()
    if libc is None:
        yield
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt parameters (malloc.h)
    libc.mallopt(m_mmap_threshold, 1 << 30)  # blocks up to 1 GB come from the heap...
    libc.mallopt(m_trim_threshold, (1 << 31) - 1)  # ...which keeps what is freed
    try:
        yield
    finally:
        libc.mallopt(m_mmap_threshold, 128 * 1024)  # glibc's defaults
        libc.mallopt(m_trim_threshold, 128 * 1024)
        libc.malloc_trim(0)


@functools.lru_cache(maxsize=1)
def _glibc() -> Any:
    """The C library when it is glibc (it has mallopt and malloc_trim), else None."""
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


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
