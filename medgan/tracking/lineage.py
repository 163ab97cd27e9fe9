"""Run provenance: a slice dataset as an MLflow dataset input, and the versions, device and commit a run used.

The dataset's digest is its content hash (MLflow's own numpy digest samples 10k values); its source is the folder
relative to the working directory (never an absolute path from outside the project) and the input manifest's hash.
"""

from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path
from typing import Any

from mlflow.entities import Dataset, DatasetInput, InputTag

from medgan import __version__

SOURCE_TYPE = "medgan_slices"


def dataset_input(dataset: Any, context: str) -> DatasetInput:
    """A slice dataset as a run input.

    Args:
        dataset: a `SliceDataset` (``path``, ``meta``, ``classes``, ``content_hash``).
        context: why the run used it, e.g. ``"train"`` or ``"evaluation"`` (the ``mlflow.data.context`` tag).
    """
    meta = dataset.meta
    path = Path(dataset.path).resolve()
    try:
        shown = str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        shown = path.name  # never an absolute path from outside the project
    manifest = str(meta.get("source_manifest_hash") or meta.get("manifest_hash") or "")
    profile = {
        "content_hash": dataset.content_hash,
        "n_slices": int(meta.get("n_slices", len(dataset))),
        "classes": list(dataset.classes),
        "counts": meta.get("counts", {}),
        "synthetic": bool(meta.get("synthetic", False)),
    }
    entity = Dataset(
        name=str(meta.get("name") or path.name),
        digest=dataset.content_hash[:32],  # MLflow stores at most 36 characters; the full hash is in the profile
        source_type=SOURCE_TYPE,
        source=json.dumps({"path": shown, "manifest_hash": manifest}),
        profile=json.dumps(profile),
    )
    return DatasetInput(entity, [InputTag("mlflow.data.context", context)])


def git_commit(cwd: Path | None = None) -> str | None:
    """The checkout's HEAD commit, or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment_params(device: str) -> dict[str, str]:
    """Versions, device and commit as run params (`device` as configured: auto | cpu | cuda[:N])."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    out = {
        "medgan.version": __version__,
        "torch.version": torch.__version__,
        "torch.cuda": str(torch.version.cuda or "none"),
        "python.version": platform.python_version(),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        out["device.name"] = torch.cuda.get_device_name(0)
    if commit := git_commit():
        out["git.commit"] = commit
    return out
