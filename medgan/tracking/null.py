"""The tracker interface and the tracker that records nothing (tracking off, DDP ranks other than 0).

`medgan.train.loop.train` receives a tracker; `medgan.tracking.runs.Tracker` is the MLflow one. This module imports
no MLflow, so a run without tracking never loads it (nanochat's ``DummyWandb``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class NullTracker:
    """Every call does nothing; `run_id` and `model_uri` stay None.

    Example:
        >>> tracker = NullTracker()
        >>> tracker.start(cfg, dataset, run_name="demo-cpu-1a2b3c")
        >>> tracker.log_metrics({"loss/d": 0.7}, step=4096)
    """

    run_id: str | None = None
    model_uri: str | None = None

    def start(self, cfg: Any, dataset: Any, run_name: str, *, resume_run_id: str | None = None) -> None:
        """Begin (or, with `resume_run_id`, continue) the run of a training on `dataset`."""

    def log_params(self, params: dict[str, str]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_image(self, image: Any, name: str, step: int) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def set_tags(self, tags: dict[str, Any]) -> None: ...

    def register_generator(
        self, G_ema: Any, cfg: Any, classes: list[str], dataset_hash: str, metrics: dict[str, float], step: int = 0
    ) -> str | None:
        return None

    def missing(self) -> list[str]:
        """What the store did not get (nothing here)."""
        return []

    def finish(self, status: str = "FINISHED") -> None: ...

    def ui_command(self) -> str:
        return ""
