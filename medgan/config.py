"""Typed configuration with recipe defaults: one dataclass per stage, YAML overlays and `--set key=value` overrides.

Every command resolves one `Config`; the resolved config travels with every artifact (dataset.json, checkpoints, the
MLflow run). YAML files are thin overlays of the form ``{section: {field: value}}``; unknown keys are errors that list
the valid ones.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medgan.config_rules import RULES


@dataclass
class IngestConfig:
    resolution: int = 128  # output side in pixels (the product is built around 128)
    slice_axis: str = "axial"  # axial | coronal | sagittal, in canonical RAS anatomy
    ct_window: str = "abdomen"  # abdomen | brain | lung | bone | custom (then window_center_hu/window_width_hu)
    window_center_hu: float = 40.0  # only for ct_window=custom
    window_width_hu: float = 400.0  # only for ct_window=custom
    mr_percentiles: list[float] = field(default_factory=lambda: [0.5, 99.5])  # per-volume clip for MR/other modalities
    foreground_level: float = -0.8  # a pixel is foreground above this value in [-1, 1]
    min_foreground_fraction: float = 0.05  # slices with less foreground are dropped as near-empty
    mask_labels: dict[str, str] = field(default_factory=dict)  # mask label id -> class name (mask-derived labels)
    mask_min_area_px: int = 64  # a mask class needs at least this many pixels on the 128x128 slice
    mask_background_class: str = ""  # class for slices where no mapped label reaches the area ("" drops them)
    dicom_label_tag: str = ""  # DICOM keyword whose value gives the class (e.g. SeriesDescription)
    dicom_label_map: dict[str, str] = field(default_factory=dict)  # tag value -> class name
    split_fractions: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])  # train/val/test by patient
    min_series_slices: int = 4  # DICOM series with fewer slices (scouts, localisers) are skipped
    volume_index: int = 0  # which volume of a 4-D NIfTI to read
    # 2-D sets: images whose 256-bit pHashes differ by <= this share a group (measured on the brain MRI set:
    # re-encoded copies differ by 4-8 bits, distinct images by >= 70).
    dedup_max_distance: int = 12
    workers: int = 0  # processes over volumes; 0 = all cores
    seed: int = 0  # split hashing salt and any sampling
    classes: list[str] = field(default_factory=list)  # allowed class names (index = label); empty = sorted names found
    image_normalization: str = "minmax"  # 2-D PNG/JPEG intensities: minmax | percentile (uses mr_percentiles)
    images_per_part: int = 256  # 2-D images processed (and resumed) together as one work item
    # A DICOM folder row that holds only sub-folders is read as one work item per sub-folder (spread over the workers);
    # false reads such a row whole (a series whose files are split over sibling folders becomes one volume).
    split_folder_rows: bool = True
    # The largest volume (decoded, as float32) a header may declare; a source declaring more is skipped unread, so a
    # tiny hostile file cannot make ingest allocate gigabytes. Each worker holds about one volume at a time.
    max_volume_mb: float = 4096.0
    # Inflate .nii.gz sources with ISA-L (the isal package, ~2.3x zlib's speed) when it is installed; false = nibabel's
    # own gzip reader. The voxels are the same either way.
    fast_gunzip: bool = True

    def __post_init__(self) -> None:
        _check_section("ingest", self)


@dataclass
class ModelConfig:
    z_dim: int = 128  # latent size
    width: int = 64  # channel multiplier; G's penultimate map and D's stem both have `width` channels at 64x64
    g_max_channels: int = 1024  # cap on G channels at low resolution (1024 at 4x4 = DCGAN-128 widths)
    d_max_channels: int = 512  # cap on D channels at low resolution
    d_reduce_channels: int | None = 32  # 1x1 conv reduction of D's 64x64 features; None ("none") = unreduced
    spectral_norm: bool = True  # spectral norm in D
    embed_dim: int = 128  # class embedding size for conditional batch norm in G
    # Weight of an auxiliary class loss through a linear head on D's pooled features (0 = no head): D learns the class
    # of real images, G is rewarded when that head recognises the class it was asked for. cpu_brain.yaml and gpu.yaml
    # set 0.5 (docs/results.md); 0 here keeps the plain design for the smoke preset and the ablation.
    class_loss: float = 0.0

    def __post_init__(self) -> None:
        _check_section("model", self)


@dataclass
class TrainConfig:
    total_kimg: float = 200.0  # training length in thousands of real images shown to D
    max_minutes: float = 0.0  # wall-clock budget of this invocation; training ends at whichever comes first (0 = none)
    batch_size: int = 32  # global batch (split across DDP ranks)
    d_steps: int = 1  # D steps per G step
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.5, 0.999])
    loss: str = "nsgan"  # nsgan (non-saturating logistic) | hinge
    label_smoothing: float = 0.0  # one-sided: real targets become 1 - label_smoothing
    r1_gamma: float = 0.1  # R1 weight; 0 disables
    r1_interval: int = 16  # lazy R1 every N D steps
    augment: str = "diffaug"  # diffaug | ada | none
    ada_target: float = 0.6  # target r_t for ADA
    ada_kimg: float = 100.0  # ADA adjustment speed (kimg for p to go 0 -> 1)
    ema_kimg: float = 10.0  # EMA half-life of G_ema in kimg
    standing_stats: int = 512  # G_ema's batch norms use its own statistics over this many images; 0 = G's
    log_every_kimg: float = 1.0
    sample_every_kimg: float = 10.0
    ckpt_every_kimg: float = 10.0
    precision: str = "auto"  # auto | bf16 | fp32 (auto: bf16 autocast on CUDA, fp32 on the CPU: docs/results.md)
    compile: str = "auto"  # auto | true | false (auto: compile on CUDA only; slower on CPU)
    channels_last: bool = True
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    ema_rampup: float = 0.05  # EMA half-life is at most this x images seen early on (0 disables; Karras 2020)
    ada_interval: int = 4  # D steps between ADA p adjustments
    health_patience: int = 3  # log intervals a symptom must persist before an alarm (overpowering, collapse)
    samples_per_class: int = 8  # fixed-noise samples per class for grids and the mode-collapse watch
    progress: bool = True  # tqdm progress bar on rank 0

    def __post_init__(self) -> None:
        _check_section("train", self)


@dataclass
class TrackConfig:
    tracking_uri: str = ""  # "" = MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
    experiment: str = ""  # "" = medgan-<dataset name>
    registered_model: str = ""  # "" = medgan-<dataset name>
    register: bool = True  # register the EMA generator at the end of training
    enabled: bool = True  # False = null tracker (training still runs)
    system_metrics: bool = True  # CPU/memory/GPU metrics through MLflow when psutil is present

    def __post_init__(self) -> None:
        _check_section("track", self)


@dataclass
class EvalConfig:
    n_per_class: int = 200  # synthetic images per class
    feature_epochs: int = 15  # domain classifier training budget
    classifier_epochs: int = 15  # TSTR / TRTR classifier budget
    near_copy_ratio: float = 0.5  # synthetic-to-train NN distance below this x the test-to-train median = near copy
    # --promote gates; a figure that is not measurable (e.g. a one-class test split) fails its gate.
    gate_min_tstr_ratio: float = 0.7  # TSTR/TRTR balanced accuracy: synthetic data keeps >= 70% of real data's use
    gate_max_near_copy_fraction: float = 0.01  # at most 1 in 100 synthetic images a near copy of a train image
    gate_min_class_fidelity: float = 0.7  # asked class recognised; well above chance (1/n_classes <= 0.5)
    gate_min_recall: float = 0.1  # real train images inside the synthetic manifold; ~0 = collapse onto a corner
    seed: int = 0  # sample seeds (the export's seed rule) and the first classifier seed
    batch_size: int = 256  # generator batch; equal to export.batch_size, evaluated images equal exported ones
    seeds: int = 3  # classifier seeds eval.seed .. eval.seed + seeds - 1: TSTR/TRTR/real+synthetic as mean ± std
    cache_dir: str = ""  # domain networks cached in <cache_dir>/features; "" = ~/.cache/medgan
    diversity_pairs: int = 50  # random same-class pairs per class for within-class MS-SSIM
    kid_subsets: int = 50  # random subsets averaged by KID (subset size = min(1000, both set sizes))
    n_figure_pairs: int = 8  # closest synthetic/train pairs shown in nearest_pairs.png
    classifier_min_steps: int = 200  # small datasets: every classifier trains at least this many steps

    def __post_init__(self) -> None:
        _check_section("eval", self)


@dataclass
class ExportConfig:
    format: str = "png"  # png | npy | nifti | dicom
    n_per_class: int = 100
    seed: int = 0  # image i of class c uses seed + a stable offset; the manifest records each
    batch_size: int = 256
    png_bits: int = 8  # 8 | 16
    split: str = "train"  # slices.csv split of every exported row (train so `medgan train` reads it as is)
    spacing_mm: float = 0.0  # in-plane pixel spacing for NIfTI/DICOM; 0 = the training data's when known, else 1.0
    # auto | cpu | cuda | cuda:N (auto: CUDA when available). Kernels round differently per device and, on a CPU,
    # sometimes from one run to the next (one float16 step seen), so pixels can differ by a grey level at most.
    device: str = "auto"
    workers: int = 0  # threads encoding and writing files; 0 = min(8, cores)
    min_class_confidence: float = 0.0  # > 0: keep samples the domain classifier gives >= this probability of its class
    max_draws_per_class: int = 0  # the filter draws at most this many images per class; 0 = 20 x n_per_class

    def __post_init__(self) -> None:
        _check_section("export", self)


@dataclass
class Config:
    """Every stage's settings; built by `load_config`, which validates each value (`validate`)."""

    ingest: IngestConfig = field(default_factory=IngestConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    track: TrackConfig = field(default_factory=TrackConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


_SECTIONS: dict[str, type] = {
    "ingest": IngestConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "track": TrackConfig,
    "eval": EvalConfig,
    "export": ExportConfig,
}


class ConfigError(ValueError):
    """A config key or value that does not fit the schema; the message lists what would."""


def check_value(key: str, value: Any) -> None:
    """Check one ``section.field`` value against its rule in `RULES`.

    Raises:
        ConfigError: one line naming the field, the value, the rule and the default, e.g.
            ``train.batch_size=0: must be >= 1 (default 32)``.
    """
    rule = RULES.get(key)
    if rule is None:
        return
    check, text = rule
    try:
        ok = bool(check(value))
    except (TypeError, ValueError, IndexError):
        ok = False
    if not ok:
        section, name = key.split(".")
        default = getattr(_SECTIONS[section](), name)
        raise ConfigError(f"{key}={value!r}: {text} (default {default!r})")


def _check_section(section: str, obj: Any) -> None:
    for f in dataclasses.fields(obj):
        check_value(f"{section}.{f.name}", getattr(obj, f.name))


def validate(cfg: Config) -> Config:
    """Check every field of `cfg` against `RULES` (the one place config values are validated) and return it.

    Raises:
        ConfigError: the first field that breaks its rule, in one line (see `check_value`).

    Example:
        >>> validate(load_config(sets=["train.batch_size=0"]))
        Traceback (most recent call last):
        ConfigError: train.batch_size=0: must be >= 1 (default 32)
    """
    for f in dataclasses.fields(cfg):
        _check_section(f.name, getattr(cfg, f.name))
    return cfg


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the annotated type, or raise a ConfigError naming the key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            value = _yaml(value, key) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item, key) for v in value]
    if origin is dict:
        kt, vt = typing.get_args(tp)
        if isinstance(value, str):
            value = _yaml(value, key)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {_coerce(k, kt, key): _coerce(v, vt, key) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp in (int, float, str):
        if tp is str:
            return ("true" if value else "false") if isinstance(value, bool) else str(value)
        try:
            out = tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and value != out:
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return out
    raise ConfigError(f"{key}: unsupported type {tp}")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def set_value(cfg: Config, dotted: str, value: Any) -> None:
    """Set ``section.field`` on `cfg`, coercing `value` to the field's type.

    Raises:
        ConfigError: the section or field does not exist (the message lists valid ones) or the value does not fit.
    """
    parts = dotted.split(".")
    sections = [f.name for f in dataclasses.fields(cfg)]
    if len(parts) != 2 or parts[0] not in sections:
        raise ConfigError(f"Unknown config key {dotted!r}: keys look like SECTION.FIELD with SECTION one of {sections}")
    section = getattr(cfg, parts[0])
    hints = _hints(type(section))
    if parts[1] not in hints:
        near = difflib.get_close_matches(parts[1], hints, n=1)
        guess = f"did you mean {parts[0]}.{near[0]}? " if near else ""
        raise ConfigError(f"Unknown config key {dotted!r}; {guess}valid keys in {parts[0]!r}: {sorted(hints)}")
    setattr(section, parts[1], _coerce(value, hints[parts[1]], dotted))


def overlay(cfg: Config, data: dict[str, Any], source: str = "overlay") -> Config:
    """Apply a nested ``{section: {field: value}}`` mapping onto `cfg` in place and return it."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
    for section, values in data.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {section!r} must be a mapping of field: value")
        for k, v in values.items():
            try:
                set_value(cfg, f"{section}.{k}", v)
            except ConfigError as e:
                raise ConfigError(f"{source}: {e}") from None
    return cfg


def load_config(
    paths: list[str | Path] | None = None, sets: list[str] | None = None, overrides: dict[str, Any] | None = None
) -> Config:
    """Resolve a Config: recipe defaults, then each YAML overlay in order, then ``key=value`` sets, then
    `overrides` (``{"section.field": value}``, e.g. from command options); every value is then validated.

    Raises:
        ConfigError: a missing file, invalid YAML (file, line and column), an unknown key or a value that breaks
            its rule (`RULES`), in one line.

    Example:
        >>> cfg = load_config(["configs/train/cpu_smoke.yaml"], ["train.batch_size=64"])
        >>> cfg.train.batch_size
        64
    """
    cfg = Config()
    for p in paths or []:
        p = Path(p)
        if not p.is_file():
            raise ConfigError(f"config file {p} not found")
        overlay(cfg, _yaml(p.read_text(), str(p), file=True) or {}, source=str(p))
    for s in sets or []:
        if "=" not in s:
            raise ConfigError(f"--set {s!r}: expected KEY=VALUE, e.g. train.batch_size=64")
        k, v = (part.strip() for part in s.split("=", 1))
        # Text fields take the text as typed: YAML would read 40:400 as a base-60 number and "no" as false.
        text_field = _field_type(k) is str
        set_value(cfg, k, v if text_field or not v else _yaml(v, f"--set {s!r}"))
    for key, value in (overrides or {}).items():
        set_value(cfg, key, value)
    return validate(cfg)


def _field_type(dotted: str) -> Any:
    section, _, name = dotted.partition(".")
    return _hints(_SECTIONS[section]).get(name) if section in _SECTIONS else None


def _yaml(text: str, source: str, *, file: bool = False) -> Any:
    """Parse YAML text; a syntax error becomes one line naming `source`, the line (of a `file`) and the column."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark, context = getattr(e, "problem_mark", None), getattr(e, "context_mark", None)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        if mark is None:
            where = source
        elif file:  # editors' FILE:LINE:COLUMN
            where = f"{source}:{mark.line + 1}:{mark.column + 1}"
        else:
            where = f"{source} (column {mark.column + 1})"
        if context is not None and getattr(e, "context", None):
            problem += f", {e.context} at {context.line + 1}:{context.column + 1}"
        raise ConfigError(f"{where}: not valid YAML ({problem}); fix the syntax there") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config (or one section) as plain nested dicts."""
    return dataclasses.asdict(cfg)


def from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from `to_dict` output (e.g. a checkpoint's resolved config). Its values are not checked
    against today's `RULES`: a saved config was checked when it was built, and an old artifact stays readable."""
    return overlay(Config(), data, source="saved config")


def flatten(cfg: Config) -> dict[str, str]:
    """``{"train.batch_size": "32", ...}``: the resolved config as flat string params (MLflow params)."""
    out: dict[str, str] = {}
    for section, values in to_dict(cfg).items():
        for k, v in values.items():
            out[f"{section}.{k}"] = "none" if v is None else str(v)
    return out


def dump_yaml(cfg: Config) -> str:
    """The resolved config as YAML (what `--dry-run` prints)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
