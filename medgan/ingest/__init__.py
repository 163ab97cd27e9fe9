"""`medgan ingest`: DICOM / NIfTI / PNG-JPEG sources -> a versioned 128x128 slice dataset (`run_ingest`).

Work is streamed through a process pool: each work item (one volume source, or a chunk of 2-D images) is read,
normalized and written to ``<out>.parts/<id>.npy`` + ``<id>.json`` by a worker; the parent keeps only small row
tables. A part's id hashes the source rows, the files' sizes and mtimes, the relevant config and the key fingerprint,
so a rerun after an interruption reuses finished parts. The parent streams finished parts in manifest-row order into
a `medgan.dataset.SliceWriter` while the workers make the next ones; once all are in, splits are assigned by
patient and the tables are written. The dataset is renamed into place only when complete.
"""

from __future__ import annotations

import functools
import itertools
import os
import shutil
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, as_completed, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medgan import __version__
from medgan.config import Config, to_dict
from medgan.dataset import SliceWriter
from medgan.ingest.manifest import Skip, Source, discover_folder, read_manifest
from medgan.ingest.privacy import Pseudonymizer, assign_splits, group_near_duplicates, key_id, load_key
from medgan.ingest.worker import (
    ScanTask,
    SeriesPlan,
    Task,
    discovery_notes,
    large_buffers_reused,
    no_series_reason,
    part_id,
    reusable,
    run_task,
    scan_task,
    series_part_id,
    source_report,
)
from medgan.io import read_json

__all__ = ["IngestReport", "run_ingest"]


@dataclass
class IngestReport:
    """What an ingest did: counts, skipped sources with reasons, where the dataset is."""

    dataset_path: Path | None
    n_slices: int
    n_ok: int
    n_skipped: int
    report: list[dict[str, Any]]
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    classes: list[str] = field(default_factory=list)
    content_hash: str = ""
    seconds: float = 0.0
    n_reused: int = 0
    n_items: int = 0  # work items (a volume source, a series of a large DICOM source, or a batch of 2-D images)

    def summary(self) -> str:
        """A human-readable summary: counts per split and class, skipped sources with reasons, the output path."""
        lines = [
            f"ingest: {self.n_ok} sources ok, {self.n_skipped} skipped, {self.n_slices} slices "
            f"in {self.seconds:.1f} s ({self.n_slices / max(self.seconds, 1e-9):.0f} slices/s)"
            + (f"; {self.n_reused} work items reused from an earlier run" if self.n_reused else "")
        ]
        if self.classes:
            width = max(8, *(len(c) for c in self.classes))
            lines.append(f"  {'split':<6} " + " ".join(f"{c:>{width}}" for c in self.classes) + f" {'total':>8}")
            for split, per in self.counts.items():
                vals = [per.get(c, 0) for c in self.classes]
                lines.append(f"  {split:<6} " + " ".join(f"{v:>{width}}" for v in vals) + f" {sum(vals):>8}")
        skipped = [r for r in self.report if r["status"] == "skipped"]
        if skipped:
            lines.append("skipped:")
            for r in skipped[:50]:
                lines.append(f"  row {r['manifest_row']} {r['source']}: {r['reason']}")
            if len(skipped) > 50:
                lines.append(f"  ... and {len(skipped) - 50} more (see report.csv)")
        if self.dataset_path is not None:
            lines.append(f"dataset: {self.dataset_path} (content hash {self.content_hash[:16]})")
        else:
            lines.append("dataset: not written (no slice could be ingested)")
        return "\n".join(lines)


def _tasks(sources: list[Source], per_part: int) -> list[list[Source]]:
    """One work item per volume source; consecutive 2-D images grouped so small files do not mean many tiny parts."""
    out: list[list[Source]] = []
    run: list[Source] = []
    for s in sources:
        if s.kind == "image2d" and s.mask is None:
            run.append(s)
            if len(run) >= max(1, per_part):
                out.append(run)
                run = []
            continue
        if run:
            out.append(run)
            run = []
        out.append([s])
    if run:
        out.append(run)
    return out


def _by_folder(files: list[Path]) -> list[list[Path]]:
    """Files in scan order, cut where the folder changes (a folder's files are consecutive in `dicom_files`)."""
    return [list(run) for _, run in itertools.groupby(files, key=lambda f: f.parent)]


def _scan_big_dicom_sources(
    sources: dict[int, tuple[Source, str]], ic: Any, key: bytes, root: Path, parts_dir: Path, pool: _Workers,
    progress: bool,
) -> tuple[dict[int, list[SeriesPlan] | str], dict[int, list[str]], dict[str, bool]]:  # fmt: skip
    """Scan the headers of every DICOM source (row -> (source, part id)) with at least ``ic.dicom_scan_files`` files
    over the workers, and plan one work item per series. Without this, a manifest row that is a whole DICOM tree is
    read by one worker.

    A folder holding at most its share of the source's files (files / workers) is one piece, and the worker that
    scans it also reads the series lying wholly in it (`scan_task`): each header is parsed once. A bigger folder is
    scanned in pieces of 64 files, and its series are read by their own work items, which parse their headers again.
    The dataset and the report are those of a serial read either way.

    Returns:
        (row -> its series plans, or the reason it has none; row -> notes of the row itself (files not used);
        series part id -> True if the scan wrote it, False if it found it intact from an earlier run).
    """
    from tqdm import tqdm

    from medgan.ingest import dicom

    if pool.n <= 1:
        return {}, {}, {}
    pieces: list[tuple[int, ScanTask]] = []
    for row, (src, pid) in sources.items():
        if src.kind != "dicom" or src.mask is not None or not src.path.is_dir():
            continue
        files = dicom.dicom_files(src.path)
        if len(files) < max(2, ic.dicom_scan_files):
            continue
        share = len(files) / pool.n
        for run in _by_folder(files):
            steps = [run] if len(run) <= share else [run[i : i + 64] for i in range(0, len(run), 64)]
            pieces += [(row, ScanTask(p, src, ic, key, root, parts_dir, pid, len(steps) == 1)) for p in steps]
    if not pieces:
        return {}, {}, {}
    # The costliest pieces first (reading a file costs ~4x scanning it); results are used in scan order.
    order = sorted(range(len(pieces)), key=lambda i: -len(pieces[i][1].files) * (4 if pieces[i][1].read else 1))
    futures = {pool.get().submit(scan_task, pieces[i][1]): i for i in order}
    results: dict[int, dict] = {}
    n_slices, t0 = 0, time.perf_counter()
    with tqdm(total=len(pieces), unit="piece", disable=not progress, desc="scan", dynamic_ncols=True) as bar:
        for f in as_completed(futures):
            i = futures[f]
            try:
                results[i] = f.result()
            except Exception as e:  # a crashed worker: scan the piece here, headers only; its series get work items
                if isinstance(e, BrokenProcessPool):
                    pool.reset()
                found, skips = dicom.scan_files(pieces[i][1].files, pieces[i][1].source.path)
                results[i] = {"scanned": found, "skips": skips, "parts": {}, "n_slices": 0}
            n_slices += results[i]["n_slices"]
            bar.update(1)
            bar.set_postfix_str(f"{n_slices / max(time.perf_counter() - t0, 1e-9):.0f} slices/s")
    scanned: dict[int, list] = defaultdict(list)
    skipped: dict[int, list] = defaultdict(list)
    parts: dict[str, bool] = {}
    for i, (row, _) in enumerate(pieces):
        scanned[row].extend(results[i]["scanned"])
        skipped[row].extend(results[i]["skips"])
        parts.update(results[i]["parts"])
    plans: dict[int, list[SeriesPlan] | str] = {}
    notes: dict[int, list[str]] = {}
    for row in dict.fromkeys(r for r, _ in pieces):
        series, more = dicom.group_series(scanned[row], ic.min_series_slices)
        skips = skipped[row] + more
        if not series:
            plans[row] = no_series_reason(skips)
            continue
        notes[row] = discovery_notes(skips)
        plans[row] = [
            SeriesPlan(s.key, s.files, i, len(series), s.modality, s.n_slices, s.label_tags)
            for i, s in enumerate(series)
        ]
    return plans, notes, parts


def _plan(
    sources: list[Source], skips: list[Skip], ic: Any, key: bytes, root: Path, parts_dir: Path, pool: _Workers,
    progress: bool = False,
) -> tuple[list[Task], dict[int, list[str]], dict[str, bool]]:  # fmt: skip
    """The work items in manifest order: one per source (or batch of 2-D images), or one per series for a DICOM
    source with many files (`_scan_big_dicom_sources`; a source where that scan finds no series joins `skips`).

    Returns:
        (the work items, notes of rows read series by series, the parts the scan found ready: id -> True when it
        wrote the part, False when an earlier run had left it intact).
    """
    kid = key_id(key)
    groups = [(group, *part_id(group, ic, kid)) for group in _tasks(sources, ic.images_per_part)]
    singles = {group[0].row: (group[0], pid) for group, pid, _ in groups if len(group) == 1}
    scans, notes, ready = _scan_big_dicom_sources(singles, ic, key, root, parts_dir, pool, progress)
    tasks = []
    for group, pid, size in groups:
        scan = scans.get(group[0].row) if len(group) == 1 else None
        if scan is None:
            tasks.append(Task(sources=group, cfg=ic, key=key, root=root, parts_dir=parts_dir, part_id=pid, size=size))
        elif isinstance(scan, str):  # the scan found no series: reported like a serial read would
            skips.append(Skip(group[0].row, group[0].rel, " ".join(scan.split())[:300]))
        else:
            for plan in scan:
                sid = series_part_id(pid, plan.key, plan.files)
                size = 0 if sid in ready else sum(f.stat().st_size for f in plan.files)  # only to order the pool
                tasks.append(Task(group, ic, key, root, parts_dir, sid, size, plan))
    return tasks, notes, ready


class _Workers:
    """The ingest's process pool, shared by the header scan and the work items and started on first use (so a run
    that needs none forks nothing). Leaving the block with an error cancels what has not started."""

    def __init__(self, n: int):
        self.n = n
        self._pool: ProcessPoolExecutor | None = None

    def reset(self) -> None:
        """Drop the pool (one whose worker died: the next `get` starts a new one)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def release(self) -> None:
        """No more work: the workers exit while the parent goes on (writing the tables), not after it."""
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

    def get(self) -> ProcessPoolExecutor:
        if self._pool is None:
            import multiprocessing as mp

            # fork starts workers without re-importing torch (seconds each); workers run torch single-threaded, so no
            # OpenMP pool is used after the fork. Elsewhere (macOS, Windows) spawn is the safe default.
            method = "fork" if sys.platform.startswith("linux") else "spawn"
            self._pool = ProcessPoolExecutor(self.n, mp_context=mp.get_context(method), initializer=_worker_init)
        return self._pool

    def __enter__(self) -> _Workers:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=exc_type is None, cancel_futures=exc_type is not None)


def largest_first(tasks: list[Task]) -> list[Task]:
    """The pool's submission order: largest sources first (manifest order among equals), so a run does not end with
    one worker busy on a big volume while the others wait. Parts are still assembled in manifest order."""
    return sorted(tasks, key=lambda t: -t.size)


def _worker_init() -> None:
    import torch

    # One process per core: intra-op threads would only oversubscribe.
    torch.set_num_threads(1)


def _execute(tasks: list[Task], pool: _Workers, progress: bool, on_done: Callable[[Task, dict], None]) -> None:
    """Run pending tasks (in-process for one worker or one task, else on the pool) with a progress bar; `on_done`
    gets each task's summary as it finishes (in the parent process)."""
    from tqdm import tqdm

    bar = tqdm(total=len(tasks), unit="item", disable=not progress, desc="ingest", dynamic_ncols=True)
    n_slices, t0 = 0, time.perf_counter()

    def done(task: Task, res: dict) -> None:
        nonlocal n_slices
        n_slices += res["n_slices"]
        bar.update(1)
        bar.set_postfix_str(f"{n_slices / max(time.perf_counter() - t0, 1e-9):.0f} slices/s")
        on_done(task, res)

    try:
        if pool.n <= 1 or len(tasks) <= 1:
            for t in tasks:
                done(t, run_task(t))
            return
        futures = {pool.get().submit(run_task, t): t for t in largest_first(tasks)}
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in finished:
                t = futures[f]
                try:
                    res = f.result()
                except Exception as e:  # a crashed worker: report its sources, do not write a part
                    reason = f"worker failed: {type(e).__name__}: {e}".replace("\n", " ")[:300]
                    res = {"failed": reason, "n_slices": 0}
                done(t, res)
    finally:
        bar.close()


class _Assembly:
    """Collects finished parts in task (manifest-row) order and streams their images into the dataset while later
    parts are still being made: the parent writes and hashes part k while the workers read the next volumes, so
    the serial step after the pool is only the tables. Parts that finish early wait for the ones before them."""

    def __init__(self, tasks: list[Task], by_row: dict[int, Source], out: Path, stack: ExitStack):
        self.tasks, self.by_row, self.out, self.stack = tasks, by_row, out, stack
        self.position = {t.part_id: i for i, t in enumerate(tasks)}
        self.results: dict[int, dict | None] = {}
        self.next = 0
        self.writer: SliceWriter | None = None
        self.report: dict[int, dict[str, Any]] = {}
        self.parts: dict[int, tuple[int, list[str]]] = {}  # row -> (slices, notes) of a source read series by series
        self.slices: list[dict] = []
        self.normalizations: set[str] = set()

    def ready(self, task: Task, res: dict | None) -> None:
        """Task `task` is finished (`res` is its summary; None for a part reused from an earlier run)."""
        self.results[self.position[task.part_id]] = res
        while self.next in self.results:
            self._take(self.tasks[self.next], self.results.pop(self.next))
            self.next += 1

    def _take(self, task: Task, res: dict | None) -> None:
        if res is not None and "failed" in res:
            if task.series is not None:  # one series of a source: the others may still give slices
                plan, row = task.series, task.sources[0].row
                self.add_notes(row, 0, [f"series {plan.index + 1}/{plan.total} skipped: {res['failed']}"])
                return
            for s in task.sources:
                self.report[s.row] = self._row(s.row, "skipped", res["failed"], 0)
            return
        path = task.parts_dir / f"{task.part_id}.npy"
        meta = read_json(path.with_suffix(".json"))
        for r in meta["report"]:
            if r["status"] == "part":  # one series of a source: merged into the source's row by `finish_reports`
                self.add_notes(r["row"], r["n_slices"], r["notes"])
            else:
                self.report[r["row"]] = self._row(r["row"], r["status"], r["reason"], r["n_slices"])
        self.slices.extend(meta["slices"])
        self.normalizations.update(meta["normalization"])
        if meta["slices"]:
            if self.writer is None:
                self.writer = self.stack.enter_context(SliceWriter(self.out))
            self.writer.add_file(path, bytes.fromhex(meta["digests"]))

    def add_notes(self, row: int, n_slices: int, notes: list[str]) -> None:
        """Add slices and notes to a row read series by series (merged into one report row by `finish_reports`)."""
        n, before = self.parts.get(row, (0, []))
        self.parts[row] = (n + n_slices, before + notes)

    def finish_reports(self) -> None:
        """Merge the series parts of each source read series by series into one report row, as a serial read of the
        source would have reported it."""
        for row, (n, notes) in self.parts.items():
            r = source_report(row, n, notes)
            self.report[row] = self._row(row, r["status"], r["reason"], r["n_slices"])

    def _row(self, row: int, status: str, reason: str, n_slices: int) -> dict[str, Any]:
        source = self.by_row[row].rel
        return {"manifest_row": row, "source": source, "status": status, "reason": reason, "n_slices": n_slices}


@functools.lru_cache(maxsize=4096)
def _stem(rel: str) -> str:
    """A source's file name without its extension (``.nii.gz`` as one): the patient key of a file without one."""
    name = Path(rel).name
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else Path(name).stem


def _patient_keys(slices: list[dict], by_row: dict[int, Source], pseudonym: Pseudonymizer, cfg: Config) -> list[str]:
    """The pseudonymous patient key of every slice (manifest id, DICOM PatientID, file stem, or duplicate group)."""
    pseudonym = functools.lru_cache(maxsize=None)(pseudonym)  # one keyed hash per source, not per slice
    keys = [""] * len(slices)
    need_group: list[int] = []
    for i, s in enumerate(slices):
        src = by_row[s["row"]]
        if src.patient:
            keys[i] = pseudonym("patient:" + src.patient)
        elif s.get("patient"):
            keys[i] = s["patient"]
        elif src.kind == "image2d":
            need_group.append(i)
        else:
            keys[i] = pseudonym("file:" + _stem(src.rel))
    if need_group:
        hashes = np.array([np.frombuffer(bytes.fromhex(slices[i]["phash"]), ">u8") for i in need_group], np.uint64)
        groups = group_near_duplicates(hashes, cfg.ingest.dedup_max_distance)
        for j, i in enumerate(need_group):
            rep = slices[need_group[int(groups[j])]]
            keys[i] = pseudonym("image-group:" + by_row[rep["row"]].rel)
    return keys


def run_ingest(
    cfg: Config,
    out: str | Path,
    *,
    manifest: str | Path | None = None,
    root: str | Path | None = None,
    folder: str | Path | None = None,
    key_file: str | Path,
    progress: bool = True,
) -> IngestReport:
    """Ingest sources into a slice dataset at `out`.

    Args:
        cfg: the resolved config (``cfg.ingest`` is used and recorded in ``dataset.json``).
        out: the dataset folder to write (replaced atomically when complete).
        manifest: a manifest CSV (see data_manifests/README.md); exclusive with `folder`.
        root: the folder manifest paths are relative to (default: the manifest's folder).
        folder: a folder of class sub-folders (``folder/<class>/...``); exclusive with `manifest`.
        key_file: the pseudonymisation key (created if missing; must lie outside `out`).
        progress: show a progress bar with slices/s.

    Returns:
        An `IngestReport`; ``dataset_path`` is None when nothing could be ingested.

    Raises:
        ValueError: both or neither of manifest/folder, a manifest with bad columns, a key inside the dataset.
        FileNotFoundError: the manifest, root or folder does not exist.

    Example:
        >>> rep = run_ingest(load_config(), "datasets/demo", manifest="data_manifests/demo.csv", root="data",
        ...                  key_file="~/.medgan/pseudonym.key")
        >>> print(rep.summary())
    """
    t0 = time.perf_counter()
    ic = cfg.ingest
    out = Path(out)
    if (manifest is None) == (folder is None):
        raise ValueError("run_ingest needs exactly one of manifest= (a CSV) or folder= (class sub-folders)")
    key = load_key(key_file, dataset=out)
    pseudonym = Pseudonymizer(key)
    if manifest is not None:
        manifest = Path(manifest)
        if not manifest.is_file():
            raise FileNotFoundError(f"manifest {manifest} not found")
        root = Path(root) if root is not None else manifest.parent
        if not root.is_dir():
            raise FileNotFoundError(f"--root {root} is not a folder; manifest paths are relative to it")
        sources, skips, source_hash = read_manifest(manifest, root, ic)
        mode = "manifest"
    else:
        root = Path(folder)  # type: ignore[arg-type]
        if not root.is_dir():
            raise FileNotFoundError(f"folder {root} not found")
        sources, skips, source_hash = discover_folder(root, ic)
        mode = "folder"

    # Work items and their resumable part files.
    parts_dir = out.with_name(out.name + ".parts")
    parts_dir.mkdir(parents=True, exist_ok=True)
    kid = key_id(key)
    workers = ic.workers or os.cpu_count() or 1
    by_row = {s.row: s for s in sources}
    with ExitStack() as stack:
        stack.enter_context(large_buffers_reused())  # before the pool: its workers inherit it
        pool = stack.enter_context(_Workers(workers))
        tasks, row_notes, ready = _plan(sources, skips, ic, key, root, parts_dir, pool, progress)
        done_before = {t.part_id for t in tasks if t.part_id in ready or reusable(parts_dir, t.part_id)}
        todo = [t for t in tasks if t.part_id not in done_before]
        n_reused = sum(not ready.get(pid, False) for pid in done_before)  # parts the scan just wrote are not reused
        # Parts stream into the dataset in manifest-row order as they finish; slices in volume order.
        asm = _Assembly(tasks, by_row, out, stack)
        for row, notes in row_notes.items():
            asm.add_notes(row, 0, notes)
        for t in tasks:
            if t.part_id in done_before:
                asm.ready(t, None)
        _execute(todo, pool, progress, asm.ready)
        pool.release()
        asm.finish_reports()
        for s in skips:
            asm.report[s.row] = {"manifest_row": s.row, "source": s.rel, "status": "skipped", "reason": s.reason,
                                 "n_slices": 0}  # fmt: skip
        report_rows = [asm.report[k] for k in sorted(asm.report)]
        n_ok = sum(r["status"] == "ok" for r in report_rows)
        n_skipped = len(report_rows) - n_ok
        slices = asm.slices
        if not slices:
            return IngestReport(
                None,
                0,
                n_ok,
                n_skipped,
                report_rows,
                seconds=time.perf_counter() - t0,
                n_reused=n_reused,
                n_items=len(tasks),
            )
        info = _finish(asm, cfg, report_rows, pseudonym, source_hash, mode, kid)
    shutil.rmtree(parts_dir, ignore_errors=True)
    return IngestReport(
        dataset_path=out,
        n_slices=info["n_slices"],
        n_ok=n_ok,
        n_skipped=n_skipped,
        report=report_rows,
        counts=info["counts"],
        classes=info["classes"],
        content_hash=info["content_hash"],
        seconds=time.perf_counter() - t0,
        n_reused=n_reused,
        n_items=len(tasks),
    )


def _finish(
    asm: _Assembly,
    cfg: Config,
    report_rows: list[dict],
    pseudonym: Pseudonymizer,
    source_hash: str,
    mode: str,
    kid: str,
) -> dict[str, Any]:
    """Classes, patient keys and patient-level splits for the assembled slices; the dataset's tables and metadata."""
    ic, slices, by_row = cfg.ingest, asm.slices, asm.by_row
    classes = list(ic.classes) if ic.classes else sorted({s["class_name"] for s in slices})
    index = {c: i for i, c in enumerate(classes)}
    patients = _patient_keys(slices, by_row, pseudonym, cfg)
    per_patient: dict[str, Counter] = defaultdict(Counter)
    fixed: dict[str, str] = {}
    for s, p in zip(slices, patients, strict=True):
        per_patient[p][s["class_name"]] += 1
        if by_row[s["row"]].split:
            fixed.setdefault(p, by_row[s["row"]].split)
    main_class = {p: sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[0][0] for p, c in per_patient.items()}
    splits = assign_splits(main_class, ic.split_fractions, ic.seed, fixed)

    rows = [
        {
            "split": by_row[s["row"]].split or splits[p],
            "label": index[s["class_name"]],
            "patient": p,
            "volume": s["volume"],
            "slice_index": s["slice_index"],
            "position_mm": s["position_mm"],
            "spacing_mm": s["spacing_mm"],
            "modality": s["modality"],
            "seed": "",
        }
        for s, p in zip(slices, patients, strict=True)
    ]

    meta = {
        "normalization": {
            "used": sorted(asm.normalizations),
            "ct_window": ic.ct_window,
            "mr_percentiles": list(ic.mr_percentiles),
            "slice_axis": ic.slice_axis,
            "display": "patient right on image left (axial, coronal); anterior (axial) or superior at the top",
        },
        "source_manifest_sha256": source_hash,
        "ingest_config": to_dict(ic),
        "provenance": {
            "medgan_version": __version__,
            "mode": mode,
            "n_sources": len(report_rows),
            "sources": [r["source"] for r in report_rows],
            "pseudonym_key_id": kid,
        },
        "splits_rule": "manifest split, else a stratified hash of the pseudonymous patient key",
    }
    assert asm.writer is not None  # noqa: S101 (there are slices, so a part with images was added)
    return asm.writer.finish(rows, classes, meta=meta, report=report_rows)
