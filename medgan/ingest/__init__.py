"""`medgan ingest`: DICOM / NIfTI / PNG-JPEG sources -> a versioned 128x128 slice dataset (`run_ingest`).

Work is streamed through a process pool: each work item (one source, or a chunk of 2-D images) is read,
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
import time
from collections import Counter, defaultdict
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from medgan import __version__
from medgan.config import Config, to_dict
from medgan.dataset import SliceWriter
from medgan.ingest.manifest import Source, discover_folder, expand_folders, read_manifest
from medgan.ingest.pool import Workers, execute, largest_first
from medgan.ingest.privacy import Pseudonymizer, Redactor, assign_splits, group_near_duplicates, key_id, load_key
from medgan.ingest.report import IngestReport, merge_parts
from medgan.ingest.store import check_out
from medgan.ingest.worker import Task, part_id, reusable
from medgan.io import read_json

__all__ = ["IngestReport", "largest_first", "run_ingest"]


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


def _plan(sources: list[Source], ic: Any, key: bytes, root: Path, parts_dir: Path) -> list[Task]:
    """The work items in manifest order: one per source, or per batch of 2-D images."""
    kid = key_id(key)
    tasks = []
    for group in _tasks(sources, ic.images_per_part):
        pid, size = part_id(group, ic, kid)
        tasks.append(Task(sources=group, cfg=ic, key=key, root=root, parts_dir=parts_dir, part_id=pid, size=size))
    return tasks


class _Assembly:
    """Collects finished parts in task (manifest-row) order and streams their images into the dataset while later
    parts are still being made: the parent writes and hashes part k while the workers read the next volumes, so
    the serial step after the pool is only the tables. Parts that finish early wait for the ones before them."""

    def __init__(self, tasks: list[Task], redact: Redactor, out: Path, stack: ExitStack):
        self.tasks, self.redact, self.out, self.stack = tasks, redact, out, stack
        self.position = {t.part_id: i for i, t in enumerate(tasks)}
        self.results: dict[int, dict | None] = {}
        self.next = 0
        self.writer: SliceWriter | None = None
        self.report: dict[tuple[int, int], dict[str, Any]] = {}  # (manifest row, sub-folder or 0) -> report row
        self.pieces: dict[str, tuple[int, int]] = {}  # volume -> the source it came from first
        self.hashed: set[str] = set()  # keyed hashes of the identifiers the workers found (`privacy.Redactor`)
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
            for src in task.sources:
                reason = self.redact.text(res["failed"])
                self.report[src.row, src.part] = self._row(src.row, self.redact.path(src.rel), "skipped", reason, 0)
            return
        path = task.parts_dir / f"{task.part_id}.npy"
        meta = read_json(path.with_suffix(".json"))
        for src, r in zip(task.sources, meta["report"], strict=True):
            self.report[src.row, src.part] = self._row(r["row"], r["source"], r["status"], r["reason"], r["n_slices"])
            self.hashed.update(r["ids"])
        keys = {s.row: (s.row, s.part) for s in task.sources}  # a task's sources are distinct rows or one sub-folder
        for s in meta["slices"]:
            self._check_piece(s, keys[s["row"]])
        self.slices.extend(meta["slices"])
        self.normalizations.update(meta["normalization"])
        if meta["slices"]:
            if self.writer is None:
                self.writer = self.stack.enter_context(SliceWriter(self.out))
            self.writer.add_file(path, bytes.fromhex(meta["digests"]))

    def _check_piece(self, s: dict, key: tuple[int, int]) -> None:
        """A series whose files lie in two sub-folders of one expanded row (`expand_folders`) is read as one volume
        per folder: each later piece gets its own volume id and the row's report line says so."""
        first = self.pieces.setdefault(s["volume"], key)
        if first == key or first[0] != key[0]:
            return
        s["volume"] = f"{s['volume']}.{key[1]}"
        note = (
            "a series continues in another sub-folder of this row: each folder's part was read as its own "
            "volume (ingest.split_folder_rows=false reads the row whole)"
        )
        for k in (first, key):
            rep = self.report[k]
            if note not in rep["reason"]:
                rep["reason"] = "; ".join(filter(None, [rep["reason"], note]))

    @staticmethod
    def _row(row: int, source: str, status: str, reason: str, n_slices: int) -> dict[str, Any]:
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
    overwrite: bool = False,
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
        overwrite: replace an existing dataset at `out` (only a medgan slice dataset is ever replaced).
        progress: show a progress bar with slices/s.

    Returns:
        An `IngestReport`; ``dataset_path`` is None when nothing could be ingested.

    Raises:
        ValueError: both or neither of manifest/folder, a manifest with bad columns or conflicting rows, a key inside
            the dataset, `overwrite` of a folder that is not a slice dataset.
        FileNotFoundError: the manifest, root or folder does not exist.
        FileExistsError: `out` exists and `overwrite` is not set.

    Example:
        >>> rep = run_ingest(load_config(), "datasets/demo", manifest="data_manifests/demo.csv", root="data",
        ...                  key_file="~/.config/medgan/pseudonym.key")
        >>> print(rep.summary())
    """
    t0 = time.perf_counter()
    ic = cfg.ingest
    out = Path(out)
    if (manifest is None) == (folder is None):
        raise ValueError("run_ingest needs exactly one of manifest= (a CSV) or folder= (class sub-folders)")
    check_out(out, overwrite)
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
    redact = Redactor(pseudonym, [s.patient for s in sources if s.patient])
    with ExitStack() as stack:
        pool = stack.enter_context(Workers(workers))
        tasks = _plan(expand_folders(sources) if ic.split_folder_rows else sources, ic, key, root, parts_dir)
        done_before = {t.part_id for t in tasks if reusable(parts_dir, t.part_id)}
        todo = [t for t in tasks if t.part_id not in done_before]
        # Parts stream into the dataset in manifest-row order as they finish; slices in volume order.
        asm = _Assembly(tasks, redact, out, stack)
        for t in tasks:
            if t.part_id in done_before:
                asm.ready(t, None)
        execute(todo, pool, progress, asm.ready)
        pool.release()
        for s in skips:
            asm.report[s.row, 0] = asm._row(s.row, s.rel, "skipped", s.reason, 0)
        skipped_rows = {s.row for s in skips}  # reasons no worker redacted
        # Every row's path redacted with the identifiers found in any source (a folder named by a PatientID that only
        # another row's files carry); a reason, already redacted by its worker, names the path the same way.
        redact = Redactor(pseudonym, [s.patient for s in sources if s.patient], asm.hashed)
        rel = {s.row: s.rel for s in [*sources, *skips]}
        report_rows = []
        for row, lines in itertools.groupby(sorted(asm.report.items()), key=lambda kv: kv[0][0]):
            parts = []
            for (_, part), r in lines:
                shown, final = r["source"], redact.path(rel[row])
                reason = r["reason"].replace(shown, final) if shown else r["reason"]
                if shown and "/" in shown:
                    reason = reason.replace(shown.rsplit("/", 1)[1], final.rsplit("/", 1)[1])
                r["source"], r["reason"] = final, redact.text(reason) if row in skipped_rows else reason
                parts.append((part, r))
            report_rows.append(merge_parts(parts))
            report_rows[-1]["reason"] = report_rows[-1]["reason"][:300]
        n_ok = sum(r["status"] == "ok" for r in report_rows)
        n_skipped = len(report_rows) - n_ok
        if not asm.slices:
            return IngestReport(None, 0, n_ok, n_skipped, report_rows, seconds=time.perf_counter() - t0,
                                n_reused=len(done_before), n_items=len(tasks))  # fmt: skip
        info = _finish(asm, by_row, cfg, report_rows, pseudonym, source_hash, mode, kid)
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
        n_reused=len(done_before),
        n_items=len(tasks),
    )


def _finish(
    asm: _Assembly,
    by_row: dict[int, Source],
    cfg: Config,
    report_rows: list[dict],
    pseudonym: Pseudonymizer,
    source_hash: str,
    mode: str,
    kid: str,
) -> dict[str, Any]:
    """Classes, patient keys and patient-level splits for the assembled slices; the dataset's tables and metadata."""
    ic, slices = cfg.ingest, asm.slices
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
    # A patient found in the data (DICOM PatientID) whose rows ask for different splits: the first row's split wins.
    overridden = {s["row"]: splits[p] for s, p in zip(slices, patients, strict=True)
                  if by_row[s["row"]].split and by_row[s["row"]].split != splits[p]}  # fmt: skip
    for r in report_rows:
        if r["manifest_row"] in overridden:
            note = (f"split {by_row[r['manifest_row']].split} not used: the same patient is in "
                    f"{overridden[r['manifest_row']]} from an earlier row")  # fmt: skip
            r["reason"] = "; ".join(filter(None, [r["reason"], note]))

    rows = [
        {
            "split": splits[p],
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
