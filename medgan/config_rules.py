"""The value rules of the config fields that have one (`RULES`): what each value must be, as its error states it."""

from __future__ import annotations

import re
import typing
from typing import Any

# Value rules, one per field that has one: (check, rule as the message states it). Types are checked by
# `medgan.config._coerce`.
Rule = tuple[typing.Callable[[Any], bool], str]


def _one_of(*values: Any) -> Rule:
    return (lambda v: v in values), "must be one of " + ", ".join(str(v) for v in values)


def _at_least(lo: float) -> Rule:
    return (lambda v: v >= lo), f"must be >= {lo}"


def _above(lo: float) -> Rule:
    return (lambda v: v > lo), f"must be > {lo}"


def _within(lo: float, hi: float) -> Rule:
    return (lambda v: lo <= v <= hi), f"must be between {lo} and {hi}"


_DEVICE: Rule = (
    lambda v: v in ("auto", "cpu", "cuda") or bool(re.fullmatch(r"cuda:\d+", v)),
    "must be one of auto, cpu, cuda, cuda:N",
)
_WINDOWS = ("abdomen", "brain", "lung", "bone", "custom", "percentile")
_WINDOW: Rule = (
    lambda v: v.lower() in _WINDOWS or bool(re.fullmatch(r"-?\d+(\.\d*)?:\d*\.?\d+", v) and float(v.split(":")[1]) > 0),
    "must be one of " + ", ".join(_WINDOWS) + " or CENTER:WIDTH in HU with WIDTH > 0 (e.g. 40:400)",
)
_BETAS: Rule = (
    lambda v: len(v) == 2 and all(0 <= b < 1 for b in v),
    "must be two numbers in [0, 1), e.g. [0.5, 0.999]",
)
_PERCENTILES: Rule = (
    lambda v: len(v) == 2 and 0 <= v[0] < v[1] <= 100,
    "must be [low, high] with 0 <= low < high <= 100",
)
_FRACTIONS: Rule = (
    lambda v: len(v) == 3 and min(v) >= 0 and sum(v) > 0,
    "must be 3 non-negative numbers (train, val, test) with a positive sum, e.g. [0.8, 0.1, 0.1]",
)
_NONE_OR_POSITIVE: Rule = (lambda v: v is None or v >= 1, "must be >= 1 or none")

RULES: dict[str, Rule] = {
    "ingest.resolution": _at_least(8),
    "ingest.slice_axis": _one_of("axial", "coronal", "sagittal"),
    "ingest.ct_window": _WINDOW,
    "ingest.window_width_hu": _above(0),
    "ingest.mr_percentiles": _PERCENTILES,
    "ingest.foreground_level": _within(-1, 1),
    "ingest.min_foreground_fraction": _within(0, 1),
    "ingest.mask_min_area_px": _at_least(0),
    "ingest.split_fractions": _FRACTIONS,
    "ingest.min_series_slices": _at_least(1),
    "ingest.volume_index": _at_least(0),
    "ingest.dedup_max_distance": _at_least(0),
    "ingest.workers": _at_least(0),
    "ingest.image_normalization": _one_of("minmax", "percentile"),
    "ingest.images_per_part": _at_least(1),
    "model.z_dim": _at_least(1),
    "model.width": _at_least(1),
    "model.g_max_channels": _at_least(1),
    "model.d_max_channels": _at_least(1),
    "model.d_reduce_channels": _NONE_OR_POSITIVE,
    "model.embed_dim": _at_least(1),
    "model.class_loss": _at_least(0),
    "train.total_kimg": _above(0),
    "train.max_minutes": _at_least(0),
    "train.batch_size": _at_least(1),
    "train.d_steps": _at_least(1),
    "train.lr_g": _above(0),
    "train.lr_d": _above(0),
    "train.betas": _BETAS,
    "train.loss": _one_of("nsgan", "hinge"),
    "train.label_smoothing": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "train.r1_gamma": _at_least(0),
    "train.r1_interval": _at_least(1),
    "train.augment": _one_of("diffaug", "ada", "none"),
    "train.ada_target": _within(0, 1),
    "train.ada_kimg": _above(0),
    "train.ema_kimg": _at_least(0),
    "train.standing_stats": _at_least(0),
    "train.log_every_kimg": _above(0),
    "train.sample_every_kimg": _above(0),
    "train.ckpt_every_kimg": _above(0),
    "train.precision": _one_of("auto", "bf16", "fp32"),
    "train.compile": _one_of("auto", "true", "false"),
    "train.device": _DEVICE,
    "train.ema_rampup": _at_least(0),
    "train.ada_interval": _at_least(1),
    "train.health_patience": _at_least(1),
    "train.samples_per_class": _at_least(1),
    "eval.n_per_class": _at_least(1),
    "eval.feature_epochs": _at_least(1),
    "eval.classifier_epochs": _at_least(1),
    "eval.near_copy_ratio": _above(0),
    "eval.gate_max_near_copy_fraction": _within(0, 1),
    "eval.diversity_pairs": _at_least(1),
    "eval.kid_subsets": _at_least(1),
    "eval.n_figure_pairs": _at_least(0),
    "eval.classifier_min_steps": _at_least(0),
    "export.format": _one_of("png", "npy", "nifti", "dicom"),
    "export.n_per_class": _at_least(1),
    "export.batch_size": _at_least(1),
    "export.png_bits": _one_of(8, 16),
    "export.split": _one_of("train", "val", "test"),
    "export.spacing_mm": _at_least(0),
    "export.device": _DEVICE,
    "export.workers": _at_least(0),
}
