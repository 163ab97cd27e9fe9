"""Input manifests: parse and validate ``source,label,patient,modality,split[,mask,window]`` rows, or discover sources
from a folder of class sub-folders. Bad rows become skips with a one-line reason; the rest goes on."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

from medgan.config import IngestConfig
from medgan.ingest.image2d import is_image2d
from medgan.ingest.nifti import is_nifti
from medgan.ingest.normalize import WINDOWS_HU

COLUMNS = ("source", "label", "patient", "modality", "split", "mask", "window")
SPLIT_NAMES = ("", "train", "val", "test")


@dataclass
class Source:
    """One input source (a manifest row or a discovered file/folder).

    Attributes:
        row: 1-based manifest data row (or discovery order in folder mode).
        rel: the path relative to the root (the only form that reaches outputs).
        path: the absolute path.
        kind: "dicom" (a folder or a file), "nifti" or "image2d".
        label: class name ("" = from the mask or a DICOM tag).
        patient: the manifest's patient id (pseudonymised before it is written anywhere), "" = from the data.
        modality: "CT", "MR", ... ("" = from the data).
        split: "train" | "val" | "test" | "" (= hashed by patient).
        mask: absolute path of a label-map NIfTI, or None.
        window: CT window override ("" = ``ingest.ct_window``).
        part: for a row read per sub-folder (`expand_folders`), which sub-folder this is (1-based; 0 = the whole row);
            `path` is then that sub-folder and `rel` stays the row's path. Outputs name it only by number.
        parts: how many sub-folders the row was read as (0 = the whole row).
    """

    row: int
    rel: str
    path: Path
    kind: str
    label: str = ""
    patient: str = ""
    modality: str = ""
    split: str = ""
    mask: Path | None = None
    window: str = ""
    part: int = 0
    parts: int = 0


@dataclass
class Skip:
    """A manifest row or discovered path that will not be read, with its one-line reason."""

    row: int
    rel: str
    reason: str


def source_kind(path: Path) -> str:
    """ "nifti", "image2d" or "dicom" (folders and any other file) for a source path."""
    if path.is_dir():
        return "dicom"
    if is_nifti(path):
        return "nifti"
    if is_image2d(path):
        return "image2d"
    return "dicom"


def _inside(rel: str) -> bool:
    """A relative path that stays under the root once ``..`` is resolved lexically (symlinks the root holds are fine:
    linking a data disk into the root is a deliberate choice; ``../`` in a manifest is not)."""
    norm = os.path.normpath(rel)
    return not Path(rel).is_absolute() and norm != ".." and not norm.startswith(".." + os.sep)


def _has_files(folder: Path) -> bool:
    return any(f for _, _, files in os.walk(folder) for f in files if not f.startswith("."))


def _check_path(raw: str, root: Path, what: str) -> tuple[Path | None, str]:
    """Resolve a manifest path under root, or return the reason it cannot be used: it must stay inside the root once
    every symlink is resolved, and be a folder or a regular file (a FIFO or a device is never opened)."""
    if not raw:
        return None, f"empty {what} path"
    p = Path(raw)
    if p.is_absolute():
        return None, f"{what} path must be relative to --root, got an absolute path"
    full = root / p
    if not _inside(raw):
        return None, f"{what} path escapes --root (paths must stay inside the root folder)"
    if not full.exists():
        return None, (f"{what} is a dangling symlink or a symlink loop" if full.is_symlink()
                      else f"{what} not found under --root")  # fmt: skip
    if not Path(os.path.realpath(full)).is_relative_to(os.path.realpath(root)):
        return None, f"{what} path escapes --root through a symlink (its real path is outside the root folder)"
    if not full.is_dir() and not full.is_file():
        return None, f"{what} is not a regular file or folder (FIFO, socket or device): not read"
    if not os.access(full, os.R_OK):
        return None, f"{what} is not readable (permissions)"
    if full.is_dir() and not _has_files(full):
        return None, f"{what} is an empty folder"
    return full, ""


def validate_window(window: str) -> str:
    """ "" when `window` is a usable CT window name, else the reason."""
    w = window.strip().lower()
    if not w or w in WINDOWS_HU or w in ("custom", "percentile"):
        return ""
    parts = w.split(":")
    try:
        if len(parts) == 2 and float(parts[1]) > 0:
            float(parts[0])
            return ""
    except ValueError:
        pass
    return f"window {window!r} is unknown; use {sorted(WINDOWS_HU)}, custom, percentile or CENTER:WIDTH in HU"


def read_manifest(manifest: Path, root: Path, cfg: IngestConfig) -> tuple[list[Source], list[Skip], str]:
    """Parse and validate a manifest CSV.

    Args:
        manifest: the CSV (header required; ``source`` column required; others optional, see data_manifests/README.md).
        root: the folder every path is relative to.
        cfg: the ingest config (``classes`` defines the allowed labels when non-empty).

    Returns:
        (usable sources, skipped rows with reasons, sha256 of the manifest bytes).

    Raises:
        ValueError: the file has no ``source`` column or has unknown columns (the message lists the valid ones).
    """
    data = manifest.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    text = data.decode("utf-8-sig")
    reader = csv.DictReader(io.StringIO(text, newline=""))  # the csv module's rules: quoted newlines stay in a field
    header = [h.strip() for h in (reader.fieldnames or [])]
    if "source" not in header:
        raise ValueError(f"{manifest}: no 'source' column; the header must name columns from {list(COLUMNS)}")
    unknown = [h for h in header if h not in COLUMNS]
    if unknown:
        raise ValueError(f"{manifest}: unknown column(s) {unknown}; valid columns are {list(COLUMNS)}")
    allowed = set(cfg.classes)
    sources: list[Source] = []
    skips: list[Skip] = []
    first_row: dict[str, int] = {}  # a source's real path -> the row that uses it
    for i, raw in enumerate(reader, start=1):
        r = {k.strip(): (v or "").strip() for k, v in raw.items() if k is not None}
        rel = r.get("source", "")
        # Never echo a path that leaves the root: the report stays relative.
        shown = rel if rel and _inside(rel) else "<outside root>"
        path, reason = _check_path(rel, root, "source")
        mask = None
        if not reason and r.get("mask"):
            mask, reason = _check_path(r["mask"], root, "mask")
            if not reason and not is_nifti(mask):
                reason = "mask must be a NIfTI label map (.nii/.nii.gz)"
        if not reason and r.get("split", "").lower() not in SPLIT_NAMES:
            reason = f"unknown split {r['split']!r}; use train, val, test or leave it empty"
        label = r.get("label", "")
        if not reason and label and allowed and label not in allowed:
            reason = f"unknown label {label!r}; ingest.classes allows {sorted(allowed)}"
        if not reason and not label and mask is None and not cfg.dicom_label_tag:
            reason = "no label: give a label, a mask, or set ingest.dicom_label_tag"
        if not reason:
            reason = validate_window(r.get("window", ""))
        if not reason:
            real = os.path.realpath(path)  # type: ignore[arg-type]
            if real in first_row:
                reason = f"duplicate of row {first_row[real]} (the same source): not ingested twice"
            first_row.setdefault(real, i)
        if reason:
            skips.append(Skip(i, shown, reason))
            continue
        assert path is not None
        sources.append(
            Source(
                row=i,
                rel=Path(rel).as_posix(),
                path=path,
                kind=source_kind(path),
                label=label,
                patient=r.get("patient", ""),
                modality=r.get("modality", "").upper(),
                split=r.get("split", "").lower(),
                mask=mask,
                window=r.get("window", ""),
            )
        )
    _check_split_conflicts(sources, manifest)
    return sources, skips, digest


def _check_split_conflicts(sources: list[Source], manifest: Path) -> None:
    """One patient, one split: rows naming the same patient with different splits are refused.

    Raises:
        ValueError: naming the rows (not the patient) and the fix.
    """
    splits: dict[str, dict[str, int]] = {}
    for s in sources:
        if s.patient and s.split:
            splits.setdefault(s.patient, {}).setdefault(s.split, s.row)
    conflicts = [rows for rows in splits.values() if len(rows) > 1]
    if conflicts:
        shown = "; ".join(", ".join(f"row {r} says {sp}" for sp, r in sorted(c.items(), key=lambda kv: kv[1]))
                          for c in conflicts[:5])  # fmt: skip
        raise ValueError(
            f"{manifest}: {len(conflicts)} patient(s) are given different splits ({shown}); a patient must stay in "
            "one split: give all of a patient's rows the same split, or leave split empty to assign it by patient"
        )


def _entry_problem(path: Path, folder: Path) -> str | None:
    """Why a discovered entry is not read (a link out of the folder, a FIFO, a device, a broken link), or None."""
    if path.is_dir() and not path.is_symlink():
        return None
    from medgan.ingest.headers import regular_file_problem

    if path.is_dir():  # a symlinked folder: read only when it stays inside
        inside = Path(os.path.realpath(path)).is_relative_to(os.path.realpath(folder))
        return None if inside else "symlink leads outside the folder: not read"
    return regular_file_problem(path, folder)


def discover_folder(folder: Path, cfg: IngestConfig) -> tuple[list[Source], list[Skip], str]:
    """Sources from a folder of class sub-folders: ``folder/<class>/<item>``.

    In each class folder, every NIfTI file and every 2-D image is one source and every sub-folder is one DICOM source
    (read recursively); loose other files directly in a class folder form one DICOM source when the class folder has no
    sub-folders, and are skipped otherwise (put each series in its own sub-folder). Sources are numbered in sorted
    order.

    Returns:
        (sources, skips, sha256 of the discovered relative path list).
    """
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"{folder} has no class sub-folders; expected {folder}/<class>/<images or series>")
    allowed = set(cfg.classes)
    sources: list[Source] = []
    skips: list[Skip] = []
    row = 0
    for name in classes:
        cdir = folder / name
        entries = sorted(e for e in cdir.iterdir() if not e.name.startswith("."))
        loose = [e for e in entries if not e.is_dir() and not is_nifti(e) and not is_image2d(e)]
        subdirs = [e for e in entries if e.is_dir()]
        items: list[tuple[Path, str]] = []
        for e in entries:
            if e.is_dir():
                items.append((e, "dicom"))
            elif is_nifti(e):
                items.append((e, "nifti"))
            elif is_image2d(e):
                items.append((e, "image2d"))
        if loose and not subdirs:
            items.insert(0, (cdir, "dicom"))
        if not items and not loose:
            row += 1
            skips.append(Skip(row, name, "empty class folder"))
            continue
        if loose and subdirs:
            row += 1
            skips.append(
                Skip(
                    row,
                    name,
                    f"{len(loose)} loose non-image files beside series sub-folders; "
                    "put each DICOM series in its own sub-folder",
                )
            )
        for path, kind in items:
            row += 1
            rel = path.relative_to(folder).as_posix()
            problem = _entry_problem(path, folder)
            if problem:
                skips.append(Skip(row, rel, problem))
            elif allowed and name not in allowed:
                skips.append(Skip(row, rel, f"unknown label {name!r}; ingest.classes allows {sorted(allowed)}"))
            elif kind == "dicom" and not _has_files(path):
                skips.append(Skip(row, rel, "empty folder"))
            else:
                sources.append(Source(row=row, rel=rel, path=path, kind=kind, label=name))
    listing = "\n".join(f"{s.row},{s.rel},{s.label}" for s in sources).encode()
    return sources, skips, hashlib.sha256(listing).hexdigest()


def _branches(folder: Path) -> list[Path]:
    """The sub-folders where a folder that holds only folders first branches (a chain of single sub-folders is
    followed down), or [] when it holds a candidate DICOM file or a symlink, or does not branch."""
    from medgan.ingest.headers import candidate_name

    while True:
        try:
            entries = [e for e in os.scandir(folder) if not e.name.startswith(".")]
        except OSError:
            return []
        if any(e.is_symlink() or (not e.is_dir() and candidate_name(e.name)) for e in entries):
            return []
        subdirs = sorted(Path(e.path) for e in entries if e.is_dir())
        if len(subdirs) != 1:
            break
        folder = subdirs[0]
    subdirs = [d for d in subdirs if _has_candidates(d)]
    return subdirs if len(subdirs) > 1 else []


def _has_candidates(folder: Path) -> bool:
    """Whether a folder holds, outside hidden folders, a file DICOM discovery would read (`dicom_files`)."""
    from medgan.ingest.headers import candidate_name

    for _, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        if any(candidate_name(f) for f in files):
            return True
    return False


def expand_folders(sources: list[Source]) -> list[Source]:
    """Each DICOM folder source that holds no DICOM file of its own, only sub-folders (an archive of patients, a study
    of series), becomes one source per sub-folder where the tree first branches, with the same row, label, patient
    and split: one big manifest row is spread over the workers like many rows. Sub-folders with nothing discovery
    would read are left out; a symlink at a level keeps the row whole, as does a mask (it fits the whole source). A
    series whose files lie in two sibling sub-folders is read as one piece per folder."""
    out: list[Source] = []
    for s in sources:
        subs = _branches(s.path) if s.kind == "dicom" and s.mask is None and s.path.is_dir() else []
        out += [dataclasses.replace(s, path=d, part=k, parts=len(subs)) for k, d in enumerate(subs, 1)] or [s]
    return out
