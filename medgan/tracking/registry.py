"""The model registry, and the one way to load a generator from any reference.

`load_generator` takes ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/RUN_ID``, a bare run id, a checkpoint
file or run folder of ``medgan train``, or an exported synthetic dataset (whose ``dataset.json`` names its generator).
`register_version`, `set_alias` and `registered_models` are the rest of the registry as medgan uses it; the CLI turns
`registered_models` into text.

Example:
    >>> loaded = load_generator("models:/medgan-brain@champion", "http://mlflow-host:5000")
    >>> loaded.info["version"], loaded.classes
    ('3', ['glioma', 'notumor'])
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import LoggedModel
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from medgan import checkpoint
from medgan.models.generator import LoadedGenerator
from medgan.tracking.store import api_error, connect, redact, resolve_uri

CANDIDATE = "candidate"
MODEL_NAME = "generator"  # the logged model's name inside a training run
MODEL_ID_TAG = "model_id"  # on a model version: its LoggedModel
EVAL_RUN_TAG = "eval.run_id"  # on a model version: its newest evaluation run (the metrics live there)


# Loading.


def load_generator(ref: str | Path, tracking_uri: str = "") -> LoadedGenerator:
    """Load a generator from the registry, a run, a checkpoint, or the exported dataset it wrote.

    Args:
        ref: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/RUN_ID[/generator]``, a bare run id, a
            checkpoint file or run folder (``runs/<run>/ckpt-000120000.pt``, its newest checkpoint), or an exported
            synthetic dataset folder (its generator is loaded).
        tracking_uri: the store for registry and run references ("" = ``sqlite:///<cwd>/mlflow.db``); a local
            checkpoint never touches it.

    Returns:
        A `LoadedGenerator` on the CPU in eval mode; ``info`` holds what is known of model_uri, name, version,
        run_id, checkpoint, dataset_hash, spacing_mm and modality.

    Raises:
        ValueError: an unknown model, alias, version or run (the message lists what exists), a file that is not a
            medgan checkpoint, a real (non-synthetic) dataset, or an unrecognised reference.
        FileNotFoundError: a checkpoint path that does not exist, or a run folder without checkpoints.
        RuntimeError: the store is unreachable or its API fails.

    Example:
        >>> loaded = load_generator("runs/demo-cpu_smoke-1a2b3c")  # the run folder's newest checkpoint
        >>> images = generate(loaded.G, labels=[0, 1], seeds=[0, 0])
    """
    ref = str(ref).strip()
    if not ref.startswith(("models:/", "runs:/")):
        path = Path(ref)
        if (path / "dataset.json").is_file():
            return _from_export(path, tracking_uri)
        if path.exists() or ref.endswith(".pt"):
            return _from_checkpoint(path)
    if not ref.startswith(("models:/", "runs:/")) and not re.fullmatch(r"[0-9a-f]{32}", ref):
        raise ValueError(
            f"cannot load {ref!r}: expected models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID, a run id, "
            "a checkpoint .pt file or run folder, or an exported synthetic dataset folder"
        )
    uri = resolve_uri(tracking_uri)
    client = connect(uri)
    try:
        if ref.startswith("models:/"):
            mv = model_version(client, ref)
            info = {"model_uri": ref, "name": mv.name, "version": str(mv.version), "run_id": mv.run_id}
            model_id = logged_model_id(mv)
            if not model_id:
                raise ValueError(f"{ref} (version {mv.version}) names no logged model; register it again")
            return _download(client, model_id, info)
        run_id, _, name = ref.removeprefix("runs:/").partition("/")
        try:
            run = client.get_run(run_id)
        except MlflowException:
            raise ValueError(f"no MLflow run {run_id!r} in {redact(uri)}") from None
        model_ids = [o.model_id for o in (run.outputs.model_outputs if run.outputs else [])]
        models = [m for m in (client.get_logged_model(i) for i in model_ids) if m.name == (name or MODEL_NAME)]
        if not models:
            raise ValueError(
                f"run {run_id} has no logged model {name or MODEL_NAME!r} (it registers one at the end of training); "
                "load a checkpoint path instead"
            )
        info: dict[str, Any] = {"model_uri": f"runs:/{run_id}/{models[-1].name}", "run_id": run_id}
        versions = client.search_model_versions(f"run_id='{run_id}'")
        if versions:
            info.update(name=versions[0].name, version=str(versions[0].version))
        return _download(client, models[-1].model_id, info)
    except MlflowException as e:
        raise api_error(uri, e) from None


def _download(client: MlflowClient, model_id: str, info: dict[str, Any]) -> LoadedGenerator:
    """Fetch a logged model's ``generator.{pt,json}`` and rebuild it (no pyfunc, no code from the artifact runs)."""
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        local = Path(_download_model_artifacts(client, model_id, tmp))
        meta = json.loads((local / "generator.json").read_text())
        state = torch.load(local / "generator.pt", map_location="cpu", weights_only=True)
    info = {
        "dataset_hash": meta.get("dataset_hash"),
        "spacing_mm": meta.get("spacing_mm"),
        "modality": meta.get("modality", ""),
        **{k: v for k, v in info.items() if v is not None},
    }
    return LoadedGenerator.from_state_dict(meta["model"], meta["classes"], state, info)


def _download_model_artifacts(client: MlflowClient, model_id: str, dst: str) -> str:
    """The ``artifacts/`` folder of a logged model's package, downloaded to `dst`."""
    from mlflow.artifacts import download_artifacts

    location = client.get_logged_model(model_id).artifact_location.rstrip("/")
    return download_artifacts(artifact_uri=f"{location}/artifacts", dst_path=dst, tracking_uri=client.tracking_uri)


def _from_checkpoint(path: Path) -> LoadedGenerator:
    """The EMA generator of a checkpoint file, or of a run folder's newest checkpoint (weights_only: no code runs)."""
    if path.is_dir():
        found = checkpoint.latest(path)
        if found is None:
            raise FileNotFoundError(f"{path} holds no ckpt-*.pt; pass a checkpoint or a run folder of medgan train")
        path = found
    state = checkpoint.load(path)
    info = {
        "checkpoint": str(path),
        "dataset_hash": state.get("dataset_hash"),
        "run_id": state.get("run_id"),
        **state.get("geometry", {}),
    }
    return LoadedGenerator.from_state_dict(state["config"]["model"], state["classes"], state["G_ema"], info)


def _from_export(path: Path, tracking_uri: str) -> LoadedGenerator:
    """The generator an exported synthetic dataset names in its ``dataset.json``."""
    meta = json.loads((path / "dataset.json").read_text())
    if not meta.get("synthetic"):
        raise ValueError(
            f"{path} is a real dataset (synthetic: false); pass a generator reference, a checkpoint or an exported "
            "synthetic dataset"
        )
    generator = dict(meta.get("generator") or {})
    ref = str(generator.get("model_uri") or "")
    ref = ref if ref.startswith(("models:/", "runs:/")) else str(generator.get("checkpoint") or "")
    if not ref or Path(ref).resolve() == path.resolve():
        raise ValueError(f"{path}/dataset.json names no generator (generator.model_uri or generator.checkpoint)")
    loaded = load_generator(ref, tracking_uri)
    loaded.info.setdefault("export", str(path))
    return loaded


# Versions and aliases.


def parse_model_ref(spec: str) -> tuple[str, str | None, str | None]:
    """``NAME``, ``NAME@ALIAS`` or ``NAME/VERSION`` (with or without ``models:/``) -> (name, alias, version)."""
    spec = spec.removeprefix("models:/").strip("/")
    if "@" in spec:
        name, alias = spec.rsplit("@", 1)
        return name, alias, None
    if "/" in spec:
        name, version = spec.rsplit("/", 1)
        return name, None, version
    return spec, None, None


def _versions(client: MlflowClient, name: str) -> list[ModelVersion]:
    return sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))


def model_version(client: MlflowClient, spec: str) -> ModelVersion:
    """The version ``NAME[@ALIAS|/VERSION]`` names (NAME alone: the newest).

    Raises:
        ValueError: an unknown model, alias or version; the message lists what exists.
    """
    name, alias, version = parse_model_ref(spec)
    try:
        rm = client.get_registered_model(name)
    except MlflowException:
        known = sorted(m.name for m in client.search_registered_models())
        raise ValueError(f"no registered model {name!r}; registered models: {known or 'none'}") from None
    aliases = dict(rm.aliases or {})
    if alias is not None:
        if alias not in aliases:
            known = ", ".join(f"@{a} -> v{v}" for a, v in sorted(aliases.items())) or "none"
            raise ValueError(f"model {name!r} has no alias {alias!r}; aliases: {known} (or use NAME/VERSION)")
        version = aliases[alias]
    versions = _versions(client, name)
    if not versions:
        raise ValueError(f"model {name!r} has no versions")
    if version is None:
        return versions[-1]
    for v in versions:
        if str(v.version) == str(version):
            return v
    raise ValueError(f"model {name!r} has no version {version}; versions: {[int(v.version) for v in versions]}")


def logged_model_id(mv: ModelVersion) -> str | None:
    """The LoggedModel id behind a model version."""
    if mv.model_id:
        return mv.model_id
    source = str(mv.source or "")
    from_source = source.removeprefix("models:/") if source.startswith("models:/m-") else None
    return (mv.tags or {}).get(MODEL_ID_TAG) or from_source


def register_version(
    client: MlflowClient, name: str, logged: LoggedModel, run_id: str, tags: dict[str, str], alias: str = CANDIDATE
) -> ModelVersion:
    """A new version of registered model `name` (created if new) from a logged model, with `tags` and `alias`."""
    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    # The artifact location, not models:/<model_id>: MLflow's SQL registry would look that up in the process-wide
    # default store rather than this client's, and does not keep model_id; the tag does.
    version = client.create_model_version(
        name,
        source=logged.artifact_location,
        run_id=run_id,
        tags={**tags, MODEL_ID_TAG: logged.model_id},
        model_id=logged.model_id,
    )
    client.set_registered_model_alias(name, alias, str(version.version))
    return version


def set_alias(tracking_uri: str, name: str, version: str | int, alias: str) -> None:
    """Point ``models:/NAME@ALIAS`` at `version` (e.g. ``champion`` after the evaluation gates pass).

    Raises:
        ValueError: the model or version does not exist (the message lists what does).
        RuntimeError: the store is unreachable or its API fails.
    """
    uri = resolve_uri(tracking_uri)
    client = connect(uri)
    mv = model_version(client, f"{name}/{version}")
    client.set_registered_model_alias(name, alias, str(mv.version))


# What is registered.


@dataclass
class VersionSummary:
    """One model version as `medgan models` shows it."""

    version: str
    created_ms: int
    run_id: str | None
    aliases: list[str]
    tags: dict[str, str]
    evaluation: dict[str, float] = field(default_factory=dict)  # metrics of its newest evaluation run


@dataclass
class ModelSummary:
    """A registered model: its aliases and (some of) its versions, oldest first."""

    name: str
    n_versions: int
    aliases: dict[str, str]
    versions: list[VersionSummary]


def registered_models(tracking_uri: str, spec: str | None = None) -> list[ModelSummary]:
    """The registered models with their newest version, or one model (``NAME``: every version; ``NAME@ALIAS`` /
    ``NAME/VERSION``: that one).

    Raises:
        ValueError: an unknown model, alias or version (the message lists what exists).
        RuntimeError: the store is unreachable or its API fails.
    """
    uri = resolve_uri(tracking_uri)
    client = connect(uri)
    try:
        if spec is None:
            models = sorted(client.search_registered_models(), key=lambda m: m.name)
            return [_summary(client, rm.name, dict(rm.aliases or {}), None, newest_only=True) for rm in models]
        name, alias, version = parse_model_ref(spec)
        selected = model_version(client, spec)
        rm = client.get_registered_model(name)
        only = None if alias is None and version is None else selected
        return [_summary(client, name, dict(rm.aliases or {}), only, newest_only=False)]
    except MlflowException as e:
        raise api_error(uri, e) from None


def _summary(
    client: MlflowClient, name: str, aliases: dict[str, str], only: ModelVersion | None, newest_only: bool
) -> ModelSummary:
    versions = _versions(client, name)
    shown = [only] if only is not None else versions[-1:] if newest_only else versions
    out = []
    for mv in shown:
        tags = dict(mv.tags or {})
        evaluation = {}
        if tags.get(EVAL_RUN_TAG):
            try:
                evaluation = dict(client.get_run(tags[EVAL_RUN_TAG]).data.metrics)
            except MlflowException:
                evaluation = {}  # the evaluation run was deleted
        mine = sorted(a for a, v in aliases.items() if str(v) == str(mv.version))
        out.append(VersionSummary(str(mv.version), int(mv.creation_timestamp), mv.run_id, mine, tags, evaluation))
    return ModelSummary(name, len(versions), aliases, out)
