"""The `medgan` command line: a thin adapter from options to library calls (lazy imports keep --help instant)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

CONFIG_HELP = "YAML overlay(s) of the form {section: {field: value}}, applied in order."
SET_HELP = "Override one config field, e.g. --set train.batch_size=64 (repeatable)."


def _config(config_files: tuple[str, ...], sets: tuple[str, ...]):
    from medgan.config import ConfigError, load_config

    try:
        return load_config(list(config_files), list(sets))
    except ConfigError as e:
        raise click.UsageError(str(e)) from None


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
      medgan ingest --manifest data_manifests/demo.csv --root data/demo --out datasets/demo
      medgan train --data datasets/demo --config configs/train/cpu_smoke.yaml
      medgan evaluate --model models:/medgan-demo@candidate --data datasets/demo
      medgan export --model models:/medgan-demo@candidate --n-per-class 50 --format png --out synthetic/demo
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
    cfg = _config(config_files, sets)
    if workers is not None:
        cfg.ingest.workers = workers
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
    from medgan.ingest.sheet import contact_sheet, describe
    from medgan.ingest.store import SliceDataset

    try:
        ds = SliceDataset.open(dataset)
        click.echo(describe(ds))
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

    try:
        result = train_loop(cfg, data, out_dir=out, resume=resume, preset=preset)
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
    cfg = _config(config_files, sets)
    _tracking_uri(tracking_uri, cfg)
    if n_per_class is not None:
        cfg.eval.n_per_class = n_per_class
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
@click.option("--force", is_flag=True, help="Replace a non-empty output folder.")
@click.option("--tracking-uri", default=None)
@config_options
def export(model_ref, out, n_per_class, fmt, seed, classes, force, tracking_uri, config_files, sets, dry_run) -> None:
    """Generate a synthetic dataset (slice-dataset format + images + MONAI datalist) from a generator."""
    cfg = _config(config_files, sets)
    _tracking_uri(tracking_uri, cfg)
    if n_per_class is not None:
        cfg.export.n_per_class = n_per_class
    if fmt is not None:
        cfg.export.format = fmt
    if seed is not None:
        cfg.export.seed = seed
    if dry_run:
        return _dry_run(cfg)
    from medgan.export import run_export

    try:
        result = run_export(cfg, model_ref, out, classes=classes.split(",") if classes else None, force=force)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as e:
        _fail(e)
    click.echo(result.summary())


@main.group()
def models() -> None:
    """Registered generators in the MLflow Model Registry."""


@models.command("list")
@click.option("--tracking-uri", default=None)
def models_list(tracking_uri) -> None:
    """List registered medgan generators with versions and aliases."""
    from medgan import tracking

    try:
        click.echo(
            tracking.describe_models(tracking.resolve_uri(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")))
        )
    except (ValueError, RuntimeError) as e:
        _fail(e)


@models.command("show")
@click.argument("name")
@click.option("--tracking-uri", default=None)
def models_show(name, tracking_uri) -> None:
    """Show one model (NAME, NAME@ALIAS or NAME/VERSION): versions, aliases, tags, headline metrics."""
    from medgan import tracking

    try:
        click.echo(
            tracking.describe_model(tracking.resolve_uri(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")), name)
        )
    except (ValueError, RuntimeError) as e:
        _fail(e)


if __name__ == "__main__":
    main()
