"""Helpers for the training tests: tiny real slice datasets, a tiny config and a recording tracker."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medgan.config import Config
from medgan.dataset import write_dataset


def halves_dataset(out: Path, n_per_class: int = 64, seed: int = 0, noise: float = 0.1) -> Path:
    """Two easily separable classes: 'left' has a bright left half, 'right' a bright right half, on black.

    `noise` is the per-pixel speckle of the bright half (hard for a young G to imitate, easy for D to spot).
    """
    rng = np.random.default_rng(seed)
    n = 2 * n_per_class
    images = np.full((n, 1, 128, 128), -1.0, dtype=np.float32)
    rows = []
    for i in range(n):
        label = i % 2
        cols = slice(0, 64) if label == 0 else slice(64, 128)
        level = rng.uniform(0.3, 0.9)
        images[i, 0, :, cols] = np.clip(level + noise * rng.standard_normal((128, 64)), -1, 1)
        rows.append(
            dict(split="train" if i < n - 8 else "val", label=label, patient=f"p{i // 4}", volume=f"v{i // 4}",
                 slice_index=i, position_mm=float(i), spacing_mm=1.0, modality="MR", seed="")
        )  # fmt: skip
    write_dataset(out, images, rows, ["left", "right"])
    return out


def tiny_config(**train) -> Config:
    """A model small enough for CPU tests: width 8, z 16, capped channels."""
    cfg = Config()
    cfg.model.width, cfg.model.z_dim, cfg.model.embed_dim = 8, 16, 16
    cfg.model.g_max_channels, cfg.model.d_max_channels, cfg.model.d_reduce_channels = 32, 32, 4
    cfg.train.batch_size, cfg.train.total_kimg = 8, 0.064
    cfg.train.log_every_kimg = cfg.train.sample_every_kimg = cfg.train.ckpt_every_kimg = 0.032
    cfg.train.ema_kimg, cfg.train.samples_per_class, cfg.train.progress = 0.05, 4, False
    cfg.train.device, cfg.train.precision = "cpu", "fp32"
    cfg.track.enabled = False
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


class RecordingTracker:
    """The tracker interface, keeping every call in memory."""

    run_id = None
    model_uri = None

    def __init__(self):
        self.metrics: list[tuple[int, dict]] = []
        self.images: list[tuple[str, int, tuple]] = []
        self.tags: dict[str, str] = {}
        self.params: dict[str, str] = {}
        self.finished: str | None = None
        self.artifacts: list[str] = []
        self.registered: int | None = None  # the step a generator was registered at

    def start(self, cfg, dataset, run_name, *, resume_run_id=None):
        self.started = (run_name, resume_run_id)

    def log_params(self, params):
        self.params.update(params)

    def log_metrics(self, metrics, step):
        self.metrics.append((step, dict(metrics)))

    def log_image(self, image, name, step):
        self.images.append((name, step, image.shape))

    def log_artifact(self, path, artifact_path=None):
        self.artifacts.append(str(path))

    def set_tags(self, tags):
        self.tags.update(tags)

    def register_generator(self, G_ema, cfg, classes, dataset_hash, metrics, step=0):
        self.registered = step

    def missing(self):
        return []

    def finish(self, status="FINISHED"):
        self.finished = status

    def ui_command(self):
        return ""
