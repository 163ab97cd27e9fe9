"""`medgan ingest`: DICOM / NIfTI / PNG-JPEG sources -> a versioned 128x128 slice dataset (`run_ingest`).

Work is streamed through a process pool: each work item (one volume source, or a chunk of 2-D images) is read,
normalized and written to ``<out>.parts/<id>.npy`` + ``<id>.json`` by a worker; the parent keeps only small row
tables. A part's id hashes the source rows, the files' sizes and mtimes, the relevant config and the key fingerprint,
so a rerun after an interruption reuses finished parts. Finally the parts are streamed in manifest-row order into
`medgan.ingest.store.write_dataset`, with splits assigned by patient, and the dataset is written atomically.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections import Counter, defaultdict
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medgan import __version__
from medgan.config import Config, to_dict
from medgan.ingest.manifest import Source, discover_folder, read_manifest
from medgan.ingest.privacy import Pseudonymizer, assign_splits, group_near_duplicates, key_id, load_key
from medgan.ingest.worker import PART_VERSION, Task, part_id, run_task
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


def _worker_init() -> None:
    import torch

    # One process per core: intra-op threads would only oversubscribe.
    torch.set_num_threads(1)


def _execute(tasks: list[Task], workers: int, progress: bool) -> tuple[dict[str, dict], int]:
    """Run pending tasks (in-process for one worker, else a process pool) with a progress bar; returns summaries."""
    from tqdm import tqdm

    results: dict[str, dict] = {}
    bar = tqdm(total=len(tasks), unit="item", disable=not progress, desc="ingest", dynamic_ncols=True)
    n_slices, t0 = 0, time.perf_counter()

    def done(task: Task, res: dict) -> None:
        nonlocal n_slices
        results[task.part_id] = res
        n_slices += res["n_slices"]
        bar.update(1)
        bar.set_postfix_str(f"{n_slices / max(time.perf_counter() - t0, 1e-9):.0f} slices/s")

    try:
        if workers <= 1 or len(tasks) <= 1:
            for t in tasks:
                done(t, run_task(t))
            return results, n_slices
        import multiprocessing as mp

        # fork starts workers without re-importing torch (seconds each); workers run torch single-threaded, so no
        # OpenMP pool is used after the fork. Elsewhere (macOS, Windows) spawn is the safe default.
        method = "fork" if sys.platform.startswith("linux") else "spawn"
        with ProcessPoolExecutor(workers, mp_context=mp.get_context(method), initializer=_worker_init) as pool:
            futures = {pool.submit(run_task, t): t for t in tasks}
            pending = set(futures)
            try:
                while pending:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for f in finished:
                        t = futures[f]
                        try:
                            done(t, f.result())
                        except Exception as e:  # a crashed worker: report its sources, do not write a part
                            reason = f"worker failed: {type(e).__name__}: {e}".replace("\n", " ")[:300]
                            done(t, {"failed": reason, "n_slices": 0})
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                raise
    finally:
        bar.close()
    return results, n_slices


def _patient_keys(slices: list[dict], by_row: dict[int, Source], pseudonym: Pseudonymizer, cfg: Config) -> list[str]:
    """The pseudonymous patient key of every slice (manifest id, DICOM PatientID, file stem, or duplicate group)."""
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
            name = Path(src.rel).name
            stem = name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else Path(name).stem
            keys[i] = pseudonym("file:" + stem)
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
    tasks = [
        Task(sources=g, cfg=ic, key=key, root=root, parts_dir=parts_dir, part_id=part_id(g, ic, kid))
        for g in _tasks(sources, ic.images_per_part)
    ]
    todo = [t for t in tasks if not (parts_dir / f"{t.part_id}.json").is_file()]
    workers = ic.workers or os.cpu_count() or 1
    results, _ = _execute(todo, min(workers, len(todo)), progress)

    # Assemble: parts in manifest-row order, slices in volume order.
    by_row = {s.row: s for s in sources}
    report: dict[int, dict[str, Any]] = {
        s.row: {"manifest_row": s.row, "source": s.rel, "status": "skipped", "reason": s.reason, "n_slices": 0}
        for s in skips
    }
    slices: list[dict] = []
    part_files: list[tuple[Path, int]] = []
    normalizations: set[str] = set()
    for t in tasks:
        res = results.get(t.part_id)
        if res is not None and "failed" in res:
            for s in t.sources:
                report[s.row] = {
                    "manifest_row": s.row,
                    "source": s.rel,
                    "status": "skipped",
                    "reason": res["failed"],
                    "n_slices": 0,
                }
            continue
        path = parts_dir / f"{t.part_id}.npy"
        meta = read_json(path.with_suffix(".json"))  # the images are read once, when the dataset is written
        if meta.get("version") != PART_VERSION:
            raise ValueError(f"{path} was written by another medgan version; delete {parts_dir} and rerun")
        for r in meta["report"]:
            report[r["row"]] = {
                "manifest_row": r["row"],
                "source": by_row[r["row"]].rel,
                "status": r["status"],
                "reason": r["reason"],
                "n_slices": r["n_slices"],
            }
        slices.extend(meta["slices"])
        normalizations.update(meta["normalization"])
        part_files.append((path, len(meta["slices"])))
    report_rows = [report[k] for k in sorted(report)]
    n_ok = sum(r["status"] == "ok" for r in report_rows)
    n_skipped = len(report_rows) - n_ok
    if not slices:
        return IngestReport(
            None, 0, n_ok, n_skipped, report_rows, seconds=time.perf_counter() - t0, n_reused=len(tasks) - len(todo)
        )

    # Classes, patients and patient-level splits.
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

    def images():  # parts streamed in order, one in memory at a time
        for path, n in part_files:
            if n:
                yield np.load(path)

    meta = {
        "normalization": {
            "used": sorted(normalizations),
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
    from medgan.ingest.store import write_dataset

    info = write_dataset(out, images(), rows, classes, meta=meta, report=report_rows)
    shutil.rmtree(parts_dir, ignore_errors=True)
    return IngestReport(
        dataset_path=out,
        n_slices=len(rows),
        n_ok=n_ok,
        n_skipped=n_skipped,
        report=report_rows,
        counts=info["counts"],
        classes=classes,
        content_hash=info["content_hash"],
        seconds=time.perf_counter() - t0,
        n_reused=len(tasks) - len(todo),
    )
