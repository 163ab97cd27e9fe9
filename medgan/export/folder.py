"""The export folder's safety checks: what an export writes there, and which ``--out`` (``--force``) it may replace."""

from __future__ import annotations

from pathlib import Path

# What an export folder holds at its top level (contact_sheet.png: `medgan info`); `_not_ours` checks the rest.
EXPORT_ENTRIES = frozenset(
    {"dataset.json", "slices.npy", "slices.csv", "report.csv", "images", "datalist.json", "manifest.csv", "README.md",
     "contact_sheet.png"}
)  # fmt: skip
STAGING = ".slices-staging.npy"


def _not_ours(out: Path) -> str | None:
    """Why the folder `out` is not an export that medgan wrote (so ``--force`` must not replace it), or None."""
    from medgan.export import manifests
    from medgan.io import read_json

    try:
        meta = read_json(out / "dataset.json")
    except (OSError, ValueError):
        return "it has no readable dataset.json, so it was not written by medgan export"
    if meta.get("synthetic") is not True:
        return "it holds a real dataset (dataset.json says synthetic: false); medgan never replaces one"
    if not isinstance(meta.get("export"), dict):
        return "its dataset.json was not written by medgan export"
    listed = {row.get("file", "") for row in manifests.read_manifest(out / "manifest.csv")}
    found = [p.name for p in out.iterdir() if p.name not in EXPORT_ENTRIES]
    found += [str(p.relative_to(out)) for p in (out / "images").rglob("*")
              if not p.is_dir() and str(p.relative_to(out)) not in listed]  # fmt: skip
    if found:
        return f"it holds files medgan export did not write: {sorted(found)[:5]}{' ...' if len(found) > 5 else ''}"
    return None


def check_out(out: Path, force: bool) -> None:
    """Refuse an `out` that is a file, or not empty without `force`, or (with `force`) not an export medgan wrote.

    Raises:
        FileExistsError: naming `out`, why, and what to do instead.
    """
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; choose a folder path")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise FileExistsError(
                f"--out {out} is not empty; pass --force to replace an earlier medgan export there, or choose another"
                " --out"
            )
        if why := _not_ours(out):
            raise FileExistsError(f"--out {out}: --force replaces only an earlier medgan export, and {why}; "
                                  "choose another --out")  # fmt: skip
    partial = out.with_name(out.name + ".partial")
    stray = [p.name for p in partial.iterdir() if p.name not in EXPORT_ENTRIES | {STAGING}
             and not p.name.endswith(".tmp")] if partial.is_dir() else []  # fmt: skip
    if stray:
        raise FileExistsError(f"{partial} holds files medgan export did not write ({sorted(stray)[:5]}); move it away")
