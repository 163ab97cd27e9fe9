"""Checkpoints: state_dicts + plain data in one torch.save buffer, written atomically, loaded with weights_only=True.

The file format lives beside the dataset contract, not in `train/`, because training writes it and the tracking
package reads it (to load a generator), and tracking imports nothing from `train/`.

A checkpoint holds G, D, G_ema, both optimizers, the augmentation and monitor state, counters, RNG state, the resolved
config, the classes and the dataset content hash, so `--resume` continues exactly. Its generator is loaded, like
every other generator reference, by `medgan.tracking.registry.load_generator`. Files are named
``ckpt-<images seen, 9 digits>.pt`` (``ckpt-000120000.pt`` = 120 kimg): they sort, and tiny smoke runs never collide.
"""

from __future__ import annotations

import io
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from medgan.io import atomic_write_bytes

PATTERN = re.compile(r"^ckpt-(\d{9})\.pt$")


def checkpoint_name(images_seen: int) -> str:
    return f"ckpt-{images_seen:09d}.pt"


def save(path: Path, state: dict[str, Any]) -> Path:
    """Write `state` atomically (a reader sees the previous checkpoint or this one, never half of one)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return atomic_write_bytes(path, buf.getvalue())


def load(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with weights_only=True (no pickled code runs).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: it is not a medgan checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise ValueError(f"{path} is not a readable medgan checkpoint ({e})") from e
    if not isinstance(state, dict) or not {"G_ema", "config", "classes"} <= state.keys():
        raise ValueError(f"{path} is not a medgan checkpoint (no G_ema/config); pass a ckpt-*.pt of medgan train")
    return state


def latest(run_dir: Path) -> Path | None:
    """The newest ``ckpt-*.pt`` in a run folder, or None."""
    found = sorted(p for p in Path(run_dir).glob("ckpt-*.pt") if PATTERN.match(p.name))
    return found[-1] if found else None


def resolve(resume: str | Path) -> Path:
    """A run folder (its latest checkpoint) or a checkpoint file.

    Raises:
        FileNotFoundError: nothing to resume from, naming what was looked for.
    """
    p = Path(resume)
    if p.is_dir():
        ckpt = latest(p)
        if ckpt is None:
            raise FileNotFoundError(f"--resume {p}: the folder holds no ckpt-*.pt; pass a run folder of medgan train")
        return ckpt
    if p.is_file():
        return p
    raise FileNotFoundError(f"--resume {p}: no such run folder or checkpoint file")


def load_latest(resume: str | Path) -> tuple[Path, dict[str, Any]]:
    """What ``--resume`` continues from: a checkpoint file as given, or a run folder's newest readable checkpoint.

    A newest checkpoint that is truncated or empty (a full disk, a copy cut short) is passed over for the one before
    it, with a warning naming both files; the bad file is left where it is.

    Args:
        resume: a run folder or a ``ckpt-*.pt`` file.

    Returns:
        The checkpoint's path and its state (see `load`).

    Raises:
        FileNotFoundError: nothing to resume from, naming what was looked for.
        ValueError: the file given, or every checkpoint of the folder, is unreadable (each is named).
    """
    p = Path(resume)
    if not p.is_dir():
        path = resolve(p)
        return path, load(path)
    found = sorted((c for c in p.glob("ckpt-*.pt") if PATTERN.match(c.name)), reverse=True)
    if not found:
        resolve(p)  # raises, naming the folder
    bad: list[tuple[Path, str]] = []
    for path in found:
        try:
            state = load(path)
        except ValueError:
            size = path.stat().st_size
            bad.append((path, "empty" if size == 0 else f"unreadable: truncated or damaged, {size} bytes"))
            continue
        if bad:
            skipped = "; ".join(f"{b.name} ({why})" for b, why in bad)
            warnings.warn(
                f"--resume {p}: skipped the newer checkpoint(s) {skipped}; resuming from {path.name}", stacklevel=2
            )
        return path, state
    raise ValueError(
        f"--resume {p}: no checkpoint there is readable ({', '.join(b.name for b, _ in bad)}); start a new run "
        "without --resume"
    )


def check_dataset(state: dict[str, Any], content_hash: str, data: Path, ckpt: Path) -> None:
    """Refuse to resume on different data than the checkpoint was trained on."""
    if state["dataset_hash"] != content_hash:
        raise ValueError(
            f"--resume {ckpt}: it was trained on a dataset with content hash {state['dataset_hash'][:12]}, but {data} "
            f"has {content_hash[:12]}; resume with the same dataset, or start a new run without --resume"
        )
