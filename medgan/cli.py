"""The `medgan` command line: a thin adapter from options to library calls (lazy imports keep --help instant)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from medgan.dataset import SliceDataset

CONFIG_HELP = "YAML overlay(s) of the form {section: {field: value}}, applied in order."
SET_HELP = "Override one config field, e.g. --set train.batch_size=64 (repeatable)."


def _config(config_files: tuple[str, ...], sets: tuple[str, ...], options: dict | None = None):
    """The resolved, validated config; command `options` (``{"section.field": value}``, None = not given) apply
    last. A bad file, key or value is one line on stderr and exit code 2, as for a bad option."""
    from medgan.config import ConfigError, load_config

    overrides = {k: v for k, v in (options or {}).items() if v is not None}
    try:
        return load_config(list(config_files), list(sets), overrides)
    except ConfigError as e:
        click.echo(f"medgan: error: {e}", err=True)
        sys.exit(2)


def _dry_run(cfg) -> None:
    from medgan.config import dump_yaml

    click.echo(dump_yaml(cfg), nl=False)


def _fail(e: Exception) -> None:
    """Library errors become one clear line and exit code 1 (tracebacks with MEDGAN_DEBUG=1)."""
    if os.environ.get("MEDGAN_DEBUG"):
        raise e
    click.echo(f"medgan: error: {e}", err=True)
    sys.exit(1)


def _tracking_uri(uri: str | None, cfg) -> None:
    if uri:
        cfg.track.tracking_uri = uri
    if not cfg.track.tracking_uri:
        # Resolved here (the CLI reads the environment; the library never does).
        cfg.track.tracking_uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    _mlflow_http_defaults()


def _mlflow_http_defaults() -> None:
    """Short HTTP retries for MLflow's client unless the user set them: by default it retries a dead server for
    minutes per call, which would stall training; medgan keeps what fails and logs it when the server is back."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")


def config_options(f):
    f = click.option("--dry-run", is_flag=True, help="Print the resolved config and exit.")(f)
    f = click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help=SET_HELP)(f)
    f = click.option("--config", "config_files", multiple=True, type=click.Path(dir_okay=False), help=CONFIG_HELP)(f)
    return f


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="medgan")
def main() -> None:
    """medgan: DICOM/NIfTI -> class-conditional GAN for 128x128 slices -> MLflow registry -> synthetic datasets.

    \b
    Typical session:
      medgan ingest --manifest data_manifests/sample.csv --root data/sample --out datasets/sample
        --config configs/ingest/sample_ct_organs.yaml
      medgan train --data datasets/sample --config configs/train/cpu_smoke.yaml
      medgan evaluate --model models:/medgan-sample@candidate --data datasets/sample
      medgan export --model models:/medgan-sample@candidate --n-per-class 50 --format png --out synthetic/sample
    """


@main.command()
@click.argument("folder", required=False, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="CSV of sources.")
@click.option(
    "--root", type=click.Path(path_type=Path), default=None, help="Folder the manifest's paths are relative to."
)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Dataset folder to write.")
@click.option(
    "--key-file",
    type=click.Path(path_type=Path),
    default=None,
    help="Pseudonymisation key (created if missing; keep it out of any repository). "
    "Default: $MEDGAN_KEY_FILE or ~/.config/medgan/pseudonym.key.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing dataset at --out (never any other folder).")
@click.option("--workers", type=int, default=None, help="Processes over volumes (default: all cores).")
@click.option("--strict", is_flag=True, help="Exit non-zero if any source is skipped.")
@config_options
def ingest(folder, manifest, root, out, key_file, overwrite, workers, strict, config_files, sets, dry_run) -> None:
    """Read DICOM / NIfTI / PNG-JPEG sources into a 128x128 slice dataset.

    Either --manifest CSV (see data_manifests/README.md) or FOLDER with one sub-folder per class.
    """
    import logging

    # pydicom's warnings can quote file names and UIDs: keep them out of the logs.
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    cfg = _config(config_files, sets, {"ingest.workers": workers})
    if dry_run:
        return _dry_run(cfg)
    if (manifest is None) == (folder is None):
        raise click.UsageError("give either --manifest CSV or a FOLDER of class sub-folders")
    from medgan.ingest import run_ingest
    from medgan.ingest.privacy import DEFAULT_KEY_FILE

    key_file = key_file or Path(os.environ.get("MEDGAN_KEY_FILE", DEFAULT_KEY_FILE)).expanduser()

    try:
        report = run_ingest(
            cfg, out, manifest=manifest, root=root, folder=folder, key_file=key_file, overwrite=overwrite, progress=True
        )
    except (ValueError, FileNotFoundError, OSError) as e:
        _fail(e)
    click.echo(report.summary())
    if report.n_slices == 0 or (strict and report.n_skipped):
        sys.exit(1)


def _describe(ds: SliceDataset) -> str:
    """A table of slice counts per split x class, plus schema, size, content hash and whether it is synthetic.

    Example:
        >>> print(_describe(SliceDataset.open("datasets/brain")))
    """
    import numpy as np

    from medgan.dataset import SPLITS

    classes = ds.classes
    labels, splits = ds.labels, ds.splits
    width = max(8, *(len(c) for c in classes)) if classes else 8
    meta = ds.meta
    lines = [
        f"dataset: {ds.path}",
        f"schema {meta.get('schema')}, {len(ds)} slices at {meta.get('resolution')}x{meta.get('resolution')}, "
        f"{len(classes)} classes, synthetic: {str(ds.synthetic).lower()}",
        f"content hash: {ds.content_hash}",
    ]
    norm = meta.get("normalization")
    if isinstance(norm, dict) and norm.get("used"):
        lines.append("normalization: " + "; ".join(norm["used"]))
    if ds.synthetic and meta.get("generator"):
        lines.append(f"generator: {meta['generator']}")
    lines.append(f"{'split':<6} " + " ".join(f"{c:>{width}}" for c in classes) + f" {'total':>8}")
    for split in SPLITS:
        in_split = labels[splits == split]
        counts = np.bincount(in_split, minlength=len(classes))
        lines.append(f"{split:<6} " + " ".join(f"{int(n):>{width}}" for n in counts) + f" {len(in_split):>8}")
    totals = np.bincount(labels, minlength=len(classes)) if len(labels) else np.zeros(len(classes), int)
    lines.append(f"{'all':<6} " + " ".join(f"{int(n):>{width}}" for n in totals) + f" {len(labels):>8}")
    patients = set(ds.column("patient").tolist()) - {""}
    if patients:
        lines.append(f"patients (pseudonymous): {len(patients)}")
    return "\n".join(lines)


@main.command()
@click.argument("dataset", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--sheet",
    type=click.Path(path_type=Path),
    default=None,
    help="Contact sheet PNG to write (default: DATASET/contact_sheet.png).",
)
@click.option("--per-class", type=int, default=8, show_default=True, help="Slices per class on the sheet.")
def info(dataset, sheet, per_class) -> None:
    """Print a dataset's counts per split and class and write a contact sheet PNG."""
    from medgan.dataset import SliceDataset
    from medgan.viz import contact_sheet

    try:
        ds = SliceDataset.open(dataset)
        click.echo(_describe(ds))
        path = contact_sheet(ds, sheet or dataset / "contact_sheet.png", per_class=per_class)
    except (ValueError, FileNotFoundError) as e:
        _fail(e)
    click.echo(f"contact sheet: {path}")


@main.command()
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("runs"),
    show_default=True,
    help="Folder for run directories (checkpoints, samples).",
)
@click.option("--resume", "resume", default=None, help="A run directory or checkpoint file to continue exactly.")
@click.option(
    "--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)."
)
@click.option("--no-track", is_flag=True, help="Run without MLflow (null tracker).")
@config_options
def train(data, out, resume, tracking_uri, no_track, config_files, sets, dry_run) -> None:
    """Train the class-conditional GAN on a slice dataset; log to MLflow and register the generator."""
    cfg = _config(config_files, sets)
    _tracking_uri(tracking_uri, cfg)
    if no_track:
        cfg.track.enabled = False
    if dry_run:
        return _dry_run(cfg)
    preset = Path(config_files[-1]).stem if config_files else "default"
    from medgan.train.loop import train as train_loop

    if cfg.track.enabled:
        from medgan.tracking.runs import Tracker

        tracker = Tracker(cfg.track)
    else:
        from medgan.tracking.null import NullTracker

        tracker = NullTracker()
    try:
        result = train_loop(cfg, data, out_dir=out, resume=resume, preset=preset, tracker=tracker)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        _fail(e)
    click.echo(result.summary())


@main.command()
@click.option(
    "--model",
    "model_ref",
    required=True,
    help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID, or a checkpoint file.",
)
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--n-per-class", type=int, default=None, help="Synthetic images per class (default eval.n_per_class).")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Report folder (default: reports/<name>).")
@click.option("--promote", is_flag=True, help="Move alias 'champion' to this version if the gates pass.")
@click.option("--tracking-uri", default=None)
@config_options
def evaluate(model_ref, data, n_per_class, out, promote, tracking_uri, config_files, sets, dry_run) -> None:
    """Offline quality, utility and privacy metrics of a generator against the real dataset."""
    cfg = _config(config_files, sets, {"eval.n_per_class": n_per_class})
    _tracking_uri(tracking_uri, cfg)
    if dry_run:
        return _dry_run(cfg)
    from medgan.evaluate import run_evaluate

    try:
        result = run_evaluate(cfg, model_ref, data, out_dir=out, promote=promote)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        _fail(e)
    click.echo(result.summary())
    if promote and not result.promoted:
        sys.exit(3)


@main.command()
@click.option(
    "--model",
    "model_ref",
    required=True,
    help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID, or a checkpoint file.",
)
@click.option("--out", required=True, type=click.Path(path_type=Path))
@click.option("--n-per-class", type=int, default=None)
@click.option("--format", "fmt", type=click.Choice(["png", "npy", "nifti", "dicom"]), default=None)
@click.option("--seed", type=int, default=None)
@click.option("--classes", default=None, help="Comma-separated class names to export (default: all).")
@click.option(
    "--force", is_flag=True, help="Replace an earlier medgan export at --out (never a real dataset or other files)."
)
@click.option(
    "--min-class-confidence",
    type=float,
    default=None,
    help="Keep only samples the domain classifier (trained on --data's real train split) assigns to their class with "
    "probability >= P; more seeds are drawn until each class has its count (export.max_draws_per_class bounds them).",
)
@click.option(
    "--data",
    type=click.Path(path_type=Path),
    default=None,
    help="The real slice dataset the generator learned from (needed by --min-class-confidence).",
)
@click.option("--tracking-uri", default=None)
@config_options
def export(
    model_ref, out, n_per_class, fmt, seed, classes, force, min_class_confidence, data, tracking_uri, config_files,
    sets, dry_run,
) -> None:  # fmt: skip
    """Generate a synthetic dataset (slice-dataset format + images + MONAI datalist) from a generator."""
    cfg = _config(
        config_files,
        sets,
        {"export.n_per_class": n_per_class, "export.format": fmt, "export.seed": seed,
         "export.min_class_confidence": min_class_confidence},
    )  # fmt: skip
    _tracking_uri(tracking_uri, cfg)
    if dry_run:
        return _dry_run(cfg)
    from medgan.export import run_export

    try:
        result = run_export(
            cfg, model_ref, out, classes=classes.split(",") if classes else None, force=force, data=data
        )
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as e:
        _fail(e)
    click.echo(result.summary())


@main.group()
def models() -> None:
    """Registered generators in the MLflow Model Registry."""


# What `medgan models` prints of a version's training tags and evaluation metrics (every value stays in MLflow).
TRAINING_HEADLINE = ("loss/d", "loss/g", "d/r_t", "aug/p", "perf/img_per_s")
EVAL_HEADLINE = ("fd", "fd_real_floor", "class_fidelity", "tstr_trtr_ratio", "near_copy_fraction", "ms_ssim_synthetic")


def _version_lines(v) -> list[str]:
    import time

    created = time.strftime("%Y-%m-%d %H:%M", time.localtime(v.created_ms / 1000))
    head = f"  v{v.version}  {created}  run {v.run_id or '-'}"
    lines = [head + (f"  @{' @'.join(v.aliases)}" if v.aliases else "")]
    other = {k: val for k, val in v.tags.items() if not k.startswith(("metric.", "eval."))}
    for k in ("classes", "dataset_hash", "resolution", "medgan_version"):
        if k in other:
            value = other.pop(k)
            lines.append(f"      {k}: {value[:16] if k == 'dataset_hash' else value}")
    training = {k[7:]: val for k, val in v.tags.items() if k.startswith("metric.")}
    training = {k: val for k, val in training.items() if k in TRAINING_HEADLINE} or training
    evaluation = {k: f"{val:.6g}" for k, val in v.evaluation.items() if k in EVAL_HEADLINE} or {
        k: f"{val:.6g}" for k, val in v.evaluation.items()
    }
    for label, values in (("training", training), ("evaluation", evaluation)):
        if values:
            lines.append(f"      {label}: " + ", ".join(f"{k}={val}" for k, val in sorted(values.items())))
    if v.tags.get("eval.run_id"):
        lines.append(f"      evaluation run: {v.tags['eval.run_id']}")
    lines += [f"      {k}: {val}" for k, val in sorted(other.items()) if k != "run_id"]
    return lines


def _models_text(uri: str, spec: str | None) -> str:
    from medgan.tracking.registry import registered_models
    from medgan.tracking.store import redact, resolve_uri

    found = registered_models(uri, spec)
    store = redact(resolve_uri(uri))  # the default store named, not ""
    if spec is None and not found:
        return f"no registered models in {store} (medgan train registers one at the end of training)"
    out = [f"registered models in {store}:"] if spec is None else []
    for m in found:
        alias_text = ", ".join(f"@{a} -> v{v}" for a, v in sorted(m.aliases.items())) or "no aliases"
        if spec is None:
            out.append(f"{m.name}: {m.n_versions} version(s), {alias_text}")
        else:
            out += [f"{m.name} ({alias_text})", f"  load: models:/{m.name}@<alias> or models:/{m.name}/<version>"]
        for v in m.versions:
            out += _version_lines(v)
    return "\n".join(out)


@models.command("list")
@click.option("--tracking-uri", default=None)
def models_list(tracking_uri) -> None:
    """List registered medgan generators with versions and aliases."""
    _mlflow_http_defaults()
    try:
        click.echo(_models_text(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", ""), None))
    except (ValueError, RuntimeError) as e:
        _fail(e)


@models.command("show")
@click.argument("name")
@click.option("--tracking-uri", default=None)
def models_show(name, tracking_uri) -> None:
    """Show one model (NAME, NAME@ALIAS or NAME/VERSION): versions, aliases, tags, headline metrics."""
    _mlflow_http_defaults()
    try:
        click.echo(_models_text(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", ""), name))
    except (ValueError, RuntimeError) as e:
        _fail(e)


if __name__ == "__main__":
    main()
