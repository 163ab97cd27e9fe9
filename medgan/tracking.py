"""MLflow tracking and model registry: the only module that imports mlflow.

A training run gets one `Tracker` (rank 0) or a `NullTracker` (tracking off, other ranks): params, metrics with a step
(images seen), sample grids as stepped images, dataset lineage with the content hash as digest, and at the end the EMA
generator logged as a pyfunc model and registered with alias ``candidate``. `load_generator` turns
``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/RUN_ID`` or a checkpoint path back into a `LoadedGenerator`.

Example:
    >>> tracker = make_tracker(cfg, SliceDataset.open("datasets/brain"), run_name="brain-gpu-1a2b")
    >>> tracker.log_metrics({"loss/d": 0.7}, step=4096)
    >>> uri = tracker.register_generator(G_ema, cfg, classes, dataset_hash, {"loss/g": 1.2})  # "models:/medgan-brain/1"
    >>> tracker.finish()
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy as np
from mlflow import MlflowClient
from mlflow.data.dataset import Dataset
from mlflow.data.dataset_source import DatasetSource
from mlflow.exceptions import MlflowException

from medgan import __version__
from medgan.config import Config, ModelConfig, dump_yaml, flatten, to_dict

CANDIDATE = "candidate"
MODEL_NAME = "generator"  # name of the logged model inside the run
PIP_REQUIREMENTS = ["mlflow>=3.0,<4", "torch>=2.4", "numpy>=1.26", "pandas>=2.0", "PyYAML>=6.0"]
HEADLINE_METRICS = ("loss/d", "loss/g", "d/r_t", "aug/p", "perf/img_per_s")  # of the training tags `models show` prints
# Of the evaluation tags `models show` prints (the promotion-relevant ones).
EVAL_HEADLINE = ("fd", "fd_real_floor", "class_fidelity", "tstr_trtr_ratio", "near_copy_fraction", "ms_ssim_synthetic")
HEALTH_TIMEOUT_S = 3.0
HEALTH_WAIT_S = 3.0  # an unreachable server fails the run this fast


# ----------------------------------------------------------------------------------------------------------------------
# Store.


def resolve_uri(uri: str | None, cwd: Path | None = None) -> str:
    """One absolute tracking URI: `uri` made absolute, or ``sqlite:///<cwd>/mlflow.db`` when empty.

    Args:
        uri: a tracking URI (``http(s)://...``, ``sqlite:///...``, ``file:...``, ``postgresql://...``), a path to a
            ``.db`` file or a folder, or ""/None for the local default.
        cwd: the folder relative URIs are resolved against (default: the current directory).

    Returns:
        An absolute URI; ``sqlite:///`` stores keep their artifacts in ``mlartifacts/`` beside the database.
    """
    base = Path(cwd or Path.cwd()).resolve()
    uri = (uri or "").strip()
    if not uri:
        return f"sqlite:///{base / 'mlflow.db'}"
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///") :])
        return f"sqlite:///{path if path.is_absolute() else (base / path).resolve()}"
    if uri.startswith("file:"):
        path = Path(urllib.parse.urlparse(uri).path)
        return (path if path.is_absolute() else base / path).resolve().as_uri()
    if "://" in uri:
        return uri.rstrip("/")
    path = (base / uri).resolve()
    return f"sqlite:///{path}" if path.suffix == ".db" else path.as_uri()


def _artifact_root(uri: str, experiment: str) -> str | None:
    """Artifact location of a new experiment: ``mlartifacts/<experiment>`` beside a SQLite file, else the server's."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / "mlartifacts" / re.sub(r"[^\w.-]", "_", experiment)).as_uri()
    return None


def _redact(uri: str) -> str:
    """The URI without a password, for params and messages."""
    try:
        parts = urllib.parse.urlsplit(uri)
        if parts.password is None:
            return uri
    except ValueError:
        return uri
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.username}:***@{parts.hostname}:{parts.port or ''}"))


def wait_for_server(uri: str, timeout_s: float, proc: subprocess.Popen | None = None) -> str | None:
    """Poll ``<uri>/health`` every 0.5 s until it answers 200 (returns None), `timeout_s` passes, or `proc` (the
    server's process, when this caller started it) exits; then returns why not, in one line."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=HEALTH_TIMEOUT_S) as r:
                if r.status == 200:
                    return None
                error = f"HTTP {r.status}"
        except (OSError, urllib.error.URLError) as e:
            error = str(e)
        if proc is not None and proc.poll() is not None:
            return f"the server process exited with code {proc.returncode}"
        if time.monotonic() >= deadline:
            return error
        time.sleep(0.5)


def check_reachable(uri: str) -> None:
    """Fail fast when an http(s) tracking server does not answer ``/health``.

    Raises:
        RuntimeError: the server is unreachable, naming it and the ways out.
    """
    if not uri.startswith(("http://", "https://")):
        return
    error = wait_for_server(uri, HEALTH_WAIT_S)
    if error is None:
        return
    raise RuntimeError(
        f"MLflow tracking server {_redact(uri)} is unreachable ({error}). "
        "Start it (mlflow server ...), fix --tracking-uri / MLFLOW_TRACKING_URI, or run with --no-track."
    )


@contextlib.contextmanager
def _using(uri: str) -> Iterator[None]:
    """Point mlflow's global tracking and registry URIs at `uri` for the fluent calls inside, then restore them."""
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved = (tracking_utils._tracking_uri, registry_utils._registry_uri)
    saved_env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        tracking_utils._tracking_uri, registry_utils._registry_uri = saved
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            raise RuntimeError(f"MLflow experiment {name!r} is deleted; restore it (mlflow experiments restore)")
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=_artifact_root(uri, name))
    except MlflowException:  # another process created it first
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


# ----------------------------------------------------------------------------------------------------------------------
# Run provenance: params, lineage.


def _git_commit(cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _environment_params(cfg: Config) -> dict[str, str]:
    import torch

    device = cfg.train.device
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
    if commit := _git_commit():
        out["git.commit"] = commit
    return out


class _SliceSource(DatasetSource):
    """Where a slice dataset came from: its folder (relative to the working directory) and its input manifest hash."""

    def __init__(self, path: str, manifest_hash: str):
        self.path, self.manifest_hash = path, manifest_hash

    @staticmethod
    def _get_source_type() -> str:
        return "medgan_slices"

    def load(self) -> str:
        return self.path

    @staticmethod
    def _can_resolve(raw_source: Any) -> bool:
        return False

    @classmethod
    def _resolve(cls, raw_source: Any) -> _SliceSource:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "manifest_hash": self.manifest_hash}

    @classmethod
    def from_dict(cls, source_dict: dict[Any, Any]) -> _SliceSource:
        return cls(source_dict["path"], source_dict.get("manifest_hash", ""))


class _SliceDatasetInput(Dataset):
    """A slice dataset as MLflow lineage: digest from the content hash (MLflow's numpy digest samples 10k values)."""

    def __init__(self, source: _SliceSource, name: str, content_hash: str, profile: dict[str, Any]):
        self._profile = profile
        # MLflow stores at most 36 characters of digest; the full hash is in the profile and the params.
        super().__init__(source=source, name=name, digest=content_hash[:32])

    def _compute_digest(self) -> str:
        raise AssertionError("the digest is always the content hash")

    @property
    def profile(self) -> dict[str, Any]:
        return self._profile

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self._profile)}


def _dataset_input(dataset: Any) -> _SliceDatasetInput:
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
    name = str(meta.get("name") or path.name)
    return _SliceDatasetInput(_SliceSource(shown, manifest), name, dataset.content_hash, profile)


# ----------------------------------------------------------------------------------------------------------------------
# The pyfunc generator model.


def _unwrap(G: Any) -> Any:
    """The plain module behind DDP (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    for attr in ("module", "_orig_mod", "module"):
        G = getattr(G, attr, G)
    return G


def _model_config(data: dict[str, Any]) -> ModelConfig:
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in data.items() if k in known})


def _build_loaded(weights: Path, config: Path, info: dict[str, Any]) -> Any:
    """Rebuild a `LoadedGenerator` from the two registry artifacts (state_dict + config JSON)."""
    import torch

    from medgan.models.generator import Generator, LoadedGenerator

    meta = json.loads(Path(config).read_text())
    model_cfg = _model_config(meta["model"])
    G = Generator.from_config(model_cfg, len(meta["classes"]))
    G.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    info = {
        "dataset_hash": meta.get("dataset_hash"),
        "spacing_mm": meta.get("spacing_mm"),
        "modality": meta.get("modality", ""),
        **{k: v for k, v in info.items() if v is not None},
    }
    return LoadedGenerator(G, meta["classes"], model_cfg, info)


class GeneratorModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: a ``label`` column (class names or indices) and a ``seed`` param -> float32 [n, 1, 128, 128].

    Image j of a request uses seed ``seed + j``: the same request gives the same pixels on any machine (CPU, fp32).
    """

    # The explicit signature is the contract; MLflow's type-hint validation of predict would warn for hints instead.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        self.loaded = _build_loaded(Path(context.artifacts["weights"]), Path(context.artifacts["config"]), {})

    def predict(self, context, model_input, params=None):
        from medgan.models.generator import generate

        column = model_input["label"] if hasattr(model_input, "columns") else model_input
        labels = [self.loaded.class_index(v if isinstance(v, str) else int(v)) for v in list(column)]
        seed = int((params or {}).get("seed", 0))
        return generate(self.loaded.G, labels, [seed + j for j in range(len(labels))])


def _code_package(tmp: Path) -> Path:
    """The part of medgan the pyfunc model imports (config, models, tracking): it loads without medgan installed."""
    import medgan

    src, dst = Path(medgan.__file__).parent, tmp / "code" / "medgan"
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(src / "models", dst / "models", ignore=skip)
    for name in ("__init__.py", "config.py", "tracking.py"):
        shutil.copy2(src / name, dst / name)
    return dst


def _signature() -> Any:
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([ColSpec(AnyType(), "label")]),  # class name (str) or index (int)
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1, 128, 128))]),
        params=ParamSchema([ParamSpec("seed", "long", 0)]),
    )


def _metric_key(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_\-./ ]", "_", name)


def _fmt(value: float) -> str:
    return f"{float(value):.6g}"


# ----------------------------------------------------------------------------------------------------------------------
# Trackers.


class NullTracker:
    """The tracker when tracking is off or on ranks other than 0: every call does nothing (nanochat's DummyWandb)."""

    run_id: str | None = None

    def log_params(self, params: dict[str, str]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_image(self, image: np.ndarray, name: str, step: int) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def set_tags(self, tags: dict[str, Any]) -> None: ...

    def register_generator(self, G_ema: Any, cfg: Config, classes: list[str], dataset_hash: str, metrics: dict) -> None:
        return None

    def finish(self, status: str = "FINISHED") -> None: ...

    def ui_command(self) -> str:
        return ""


class Tracker:
    """One MLflow run. Logging failures warn once and are retried later; they never raise into the training loop.

    Attributes:
        run_id: the MLflow run id.
        uri: the absolute tracking URI.
        experiment_id: the run's experiment.
    """

    retry_interval_s = 60.0  # after a failure, calls are skipped this long before the store is tried again

    def __init__(self, uri: str, experiment_id: str, run_id: str, registered_model: str, monitor: Any = None):
        self.uri, self.experiment_id, self.run_id = uri, experiment_id, run_id
        self.registered_model = registered_model
        self.client = MlflowClient(tracking_uri=uri)
        self._monitor = monitor
        self._down_until = 0.0
        self._failures = 0  # failed calls so far
        self._down = False  # inside an outage (warned once; a success ends it)
        self._finished = False
        self._params: dict[str, str] = {}  # logged so far: MLflow rejects a changed value for a logged key
        self.geometry: dict[str, Any] = {}  # the training data's spacing_mm / modality, stored with the model

    def _safe(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run one logging call; on error warn (once per outage), skip calls for a while, and return None."""
        if time.monotonic() < self._down_until:
            return None
        try:
            result = fn()
        except Exception as e:  # a tracking outage must never stop training
            self._failures += 1
            self._down_until = time.monotonic() + self.retry_interval_s
            if not self._down:
                self._down = True
                warnings.warn(
                    f"MLflow {what} failed for run {self.run_id} at {_redact(self.uri)}: {e}. Training continues and "
                    f"checkpoints stay local; logging is retried every {self.retry_interval_s:.0f} s.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return None
        self._down = False
        return result

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        fresh, changed = {}, []
        for k, v in params.items():
            v = _redact(str(v))[:6000]
            if k not in self._params:
                fresh[k] = v
            elif self._params[k] != v:
                changed.append(k)
        if changed:
            warnings.warn(f"MLflow params cannot change within a run; kept the first values of {changed}", stacklevel=2)
        if fresh:

            def log() -> bool:
                self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in fresh.items()], synchronous=True)
                return True

            if self._safe("log_params", log):
                self._params.update(fresh)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(_metric_key(k), float(v), now, int(step)) for k, v in metrics.items()]
        self._safe("log_metrics", lambda: self.client.log_batch(self.run_id, metrics=items, synchronous=True))

    def log_image(self, image: np.ndarray, name: str, step: int) -> None:
        """Log a uint8 image (H, W) or (H, W, 3) under `name` at `step`: the UI shows its history with a step slider."""
        img = np.ascontiguousarray(image)
        self._safe("log_image", lambda: self.client.log_image(self.run_id, img, key=_metric_key(name), step=int(step)))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        log = self.client.log_artifacts if path.is_dir() else self.client.log_artifact
        self._safe("log_artifact", lambda: log(self.run_id, str(path), artifact_path))

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)[:5000]) for k, v in tags.items()]
        self._safe("set_tags", lambda: self.client.log_batch(self.run_id, tags=items, synchronous=True))

    def register_generator(
        self, G_ema: Any, cfg: Config, classes: list[str], dataset_hash: str, metrics: dict[str, float]
    ) -> str | None:
        """Log the EMA generator as a pyfunc model, register it, and give the new version alias ``candidate``.

        Args:
            G_ema: the EMA generator (DDP/compile wrappers are unwrapped).
            cfg: the resolved config (its ``model`` section rebuilds the network).
            classes: class names, index = label.
            dataset_hash: the training dataset's content hash.
            metrics: headline metrics, stored as ``metric.<name>`` version tags.

        Returns:
            ``models:/<name>/<version>``, or None when the store failed (a warning says why).
        """
        return self._safe("register_generator", lambda: self._register(G_ema, cfg, classes, dataset_hash, metrics))

    def _register(self, G_ema: Any, cfg: Config, classes: list[str], dataset_hash: str, metrics: dict) -> str:
        import torch

        G = _unwrap(G_ema)
        if G.num_classes != len(classes) or G.z_dim != cfg.model.z_dim:
            raise ValueError(
                f"generator has {G.num_classes} classes and z_dim {G.z_dim} but the config/classes say "
                f"{len(classes)} and {cfg.model.z_dim}"
            )
        info = {
            "model": to_dict(cfg.model),
            "classes": list(classes),
            "dataset_hash": dataset_hash,
            "resolution": 128,
            "medgan_version": __version__,
            **self.geometry,
        }
        import pandas as pd

        with tempfile.TemporaryDirectory() as tmp:
            weights, config = Path(tmp) / "generator.pt", Path(tmp) / "generator.json"
            torch.save({k: v.detach().float().cpu() for k, v in G.state_dict().items()}, weights)
            config.write_text(json.dumps(info, indent=2))
            # Created here so it lands in this run's experiment (the fluent default would be experiment 0).
            logged = self.client.create_logged_model(
                self.experiment_id, name=MODEL_NAME, source_run_id=self.run_id, tags={"dataset_hash": dataset_hash}
            )
            with _using(self.uri):
                model_info = mlflow.models.Model.log(
                    artifact_path=None,
                    name=MODEL_NAME,
                    flavor=mlflow.pyfunc,
                    run_id=self.run_id,
                    model_id=logged.model_id,
                    python_model=GeneratorModel(),
                    artifacts={"weights": str(weights), "config": str(config)},
                    code_paths=[str(_code_package(Path(tmp)))],
                    signature=_signature(),
                    input_example=(pd.DataFrame({"label": [classes[0], classes[-1]]}), {"seed": 0}),
                    pip_requirements=PIP_REQUIREMENTS,
                    flavor_name="pyfunc.CustomPythonModel",
                )
                tags = {
                    "dataset_hash": dataset_hash,
                    "run_id": self.run_id,
                    "resolution": "128",
                    "classes": ",".join(classes),
                    "medgan_version": __version__,
                    **{f"metric.{_metric_key(k)}": _fmt(v) for k, v in metrics.items()},
                }
                version = mlflow.register_model(model_info.model_uri, self.registered_model, tags=tags)
        self.client.set_registered_model_alias(self.registered_model, CANDIDATE, version.version)
        uri = f"models:/{self.registered_model}/{version.version}"
        self.client.set_tag(self.run_id, "medgan.model_uri", uri)
        return uri

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with `status` (FINISHED | FAILED | KILLED); safe to call twice."""
        if self._finished:
            return
        self._finished = True
        if self._monitor is not None:
            with contextlib.suppress(Exception):
                self._monitor.finish()
        self._down_until = 0.0
        self._safe("finish", lambda: self.client.set_terminated(self.run_id, status))

    def ui_command(self) -> str:
        """The command that shows this run in the MLflow UI (the server URL for http stores)."""
        if self.uri.startswith(("http://", "https://")):
            return f"open {_redact(self.uri)}/#/experiments/{self.experiment_id}/runs/{self.run_id}"
        return f"mlflow ui --backend-store-uri {shlex.quote(self.uri)}"


def make_tracker(
    cfg: Config, dataset: Any, run_name: str, rank: int = 0, resume_run_id: str | None = None
) -> Tracker | NullTracker:
    """Start the MLflow run for a training (rank 0 with tracking on), or return a `NullTracker`.

    Logs the flattened config, dataset hash/classes, versions, git commit, device, and the dataset lineage.

    Args:
        cfg: the resolved config; ``cfg.track`` picks the store, experiment and registered model.
        dataset: the training `SliceDataset`.
        run_name: the MLflow run name (``<dataset>-<preset>-<short id>``).
        rank: the process rank; only rank 0 tracks.
        resume_run_id: continue this run (a resumed training) when the store has it; otherwise a new run starts.

    Returns:
        A started `Tracker`, or a `NullTracker`.

    Raises:
        RuntimeError: an http(s) tracking server is unreachable (checked before any training starts).
    """
    if not cfg.track.enabled or rank != 0:
        return NullTracker()
    uri = resolve_uri(cfg.track.tracking_uri)
    check_reachable(uri)
    if uri.startswith(("http://", "https://")):
        # MLflow's HTTP client otherwise retries a dead server for minutes per call.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    name = str(dataset.meta.get("name") or Path(dataset.path).name)
    client = MlflowClient(tracking_uri=uri)
    experiment_id = _experiment_id(client, cfg.track.experiment or f"medgan-{name}", uri)
    commit = _git_commit()
    tags = {"medgan.dataset": name, "medgan.dataset_hash": dataset.content_hash, "mlflow.source.name": "medgan train"}
    if commit:
        tags["mlflow.source.git.commit"] = commit
    run = None
    if resume_run_id:
        with contextlib.suppress(MlflowException):
            run = client.get_run(resume_run_id)
            client.update_run(run.info.run_id, status="RUNNING")
        if run is None:
            tags["medgan.resumed_from_run"] = resume_run_id
    if run is None:
        run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    monitor = None
    if cfg.track.system_metrics:
        with contextlib.suppress(ImportError, Exception):
            import psutil  # noqa: F401
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(run.info.run_id, resume_logging=run.data.params != {}, tracking_uri=uri)
            monitor.start()
    model_name = cfg.track.registered_model or f"medgan-{name}"
    tracker = Tracker(uri, run.info.experiment_id, run.info.run_id, model_name, monitor)
    tracker.geometry = dataset.geometry()  # spacing/modality travel with the registered model (exports state them)
    tracker._params = dict(run.data.params)
    params = flatten(cfg)
    params.update(
        {
            "track.resolved_uri": uri,
            "dataset.name": name,
            "dataset.content_hash": dataset.content_hash,
            "dataset.classes": ",".join(dataset.classes),
            "dataset.n_slices": str(len(dataset)),
            **_environment_params(cfg),
        }
    )
    tracker.log_params(params)
    shown = copy.deepcopy(cfg)
    shown.track.tracking_uri = _redact(shown.track.tracking_uri)
    tracker._safe("log_text", lambda: client.log_text(run.info.run_id, dump_yaml(shown), "config.yaml"))
    lineage = _dataset_input(dataset)._to_mlflow_entity()
    from mlflow.entities import DatasetInput, InputTag

    tracker._safe(
        "log_input",
        lambda: client.log_inputs(run.info.run_id, [DatasetInput(lineage, [InputTag("mlflow.data.context", "train")])]),
    )
    return tracker


# ----------------------------------------------------------------------------------------------------------------------
# Registry: load, evaluate, alias, describe.


def _parse_model_ref(spec: str) -> tuple[str, str | None, str | None]:
    """``NAME``, ``NAME@ALIAS`` or ``NAME/VERSION`` -> (name, alias, version)."""
    spec = spec.removeprefix("models:/").strip("/")
    if "@" in spec:
        name, alias = spec.rsplit("@", 1)
        return name, alias, None
    if "/" in spec:
        name, version = spec.rsplit("/", 1)
        return name, None, version
    return spec, None, None


def _model_version(client: MlflowClient, spec: str) -> Any:
    """The ModelVersion that ``NAME[@ALIAS|/VERSION]`` names (NAME alone: the newest); errors list what exists."""
    name, alias, version = _parse_model_ref(spec)
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
    versions = sorted((v for v in client.search_model_versions(f"name='{name}'")), key=lambda v: int(v.version))
    if not versions:
        raise ValueError(f"model {name!r} has no versions")
    if version is None:
        return versions[-1]
    for v in versions:
        if str(v.version) == str(version):
            return v
    raise ValueError(f"model {name!r} has no version {version}; versions: {[int(v.version) for v in versions]}")


def _download_generator(client: MlflowClient, uri: str, model_id: str | None, source: str, info: dict) -> Any:
    """Fetch ``artifacts/generator.{pt,json}`` of a logged model and rebuild it (no pyfunc, no code unpickling)."""
    if not model_id and source.startswith("models:/m-"):
        model_id = source.removeprefix("models:/")  # MLflow 3 versions point at their logged model
    location = client.get_logged_model(model_id).artifact_location if model_id else source
    with tempfile.TemporaryDirectory() as tmp, _using(uri):
        local = Path(mlflow.artifacts.download_artifacts(f"{location.rstrip('/')}/artifacts", dst_path=tmp))
        return _build_loaded(local / "generator.pt", local / "generator.json", info)


def load_generator(ref: str, tracking_uri: str = "") -> Any:
    """Load a generator from the registry, a run, or a checkpoint file.

    Args:
        ref: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/RUN_ID[/generator]``, a bare run id, or a
            checkpoint file or run folder (``runs/<run>/ckpt-000120.pt``).
        tracking_uri: the store ("" = ``sqlite:///<cwd>/mlflow.db``).

    Returns:
        A `LoadedGenerator` on the CPU in eval mode; ``info`` holds model_uri, name, version, run_id, dataset_hash.

    Raises:
        ValueError: an unknown model, alias, version or run (the message lists what exists), or an unrecognised ref.
        FileNotFoundError: a checkpoint path that does not exist.
    """
    ref = ref.strip()
    if not ref.startswith(("models:/", "runs:/")) and (Path(ref).exists() or ref.endswith(".pt")):
        from medgan.train.checkpoint import load_generator as load_checkpoint

        if not Path(ref).exists():
            raise FileNotFoundError(f"checkpoint {ref} not found")
        return load_checkpoint(Path(ref))
    uri = resolve_uri(tracking_uri)
    check_reachable(uri)
    client = MlflowClient(tracking_uri=uri)
    if ref.startswith("models:/"):
        mv = _model_version(client, ref)
        info = {"model_uri": ref, "name": mv.name, "version": str(mv.version), "run_id": mv.run_id}
        return _download_generator(client, uri, getattr(mv, "model_id", None), mv.source, info)
    if ref.startswith("runs:/") or re.fullmatch(r"[0-9a-f]{32}", ref):
        run_id, _, name = ref.removeprefix("runs:/").partition("/")
        try:
            run = client.get_run(run_id)
        except MlflowException:
            raise ValueError(f"no MLflow run {run_id!r} in {_redact(uri)}") from None
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
        return _download_generator(client, uri, models[-1].model_id, "", info)
    raise ValueError(
        f"cannot load {ref!r}: expected models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID, a run id, "
        "or a checkpoint .pt path"
    )


def log_evaluation(tracking_uri: str, loaded_info: dict, metrics: dict[str, float], report_dir: Path) -> str | None:
    """Record an evaluation as an MLflow run linked to the evaluated model, and tag the model version with its metrics.

    Args:
        tracking_uri: the store ("" = local default).
        loaded_info: `LoadedGenerator.info` (name, version, run_id, model_uri, checkpoint, dataset_hash; those known).
        metrics: evaluation metrics; each becomes a run metric and an ``eval.<name>`` model-version tag.
        report_dir: the evaluation report folder, logged under ``evaluation/``.

    Returns:
        The evaluation run id, or None when the store failed (a warning says why; the local report is unaffected).
    """
    try:
        uri = resolve_uri(tracking_uri)
        check_reachable(uri)
        client = MlflowClient(tracking_uri=uri)
        source_run = loaded_info.get("run_id")
        experiment_id = None
        if source_run:
            with contextlib.suppress(MlflowException):
                experiment_id = client.get_run(source_run).info.experiment_id
        experiment_id = experiment_id or _experiment_id(client, "medgan-evaluations", uri)
        name, version = loaded_info.get("name"), loaded_info.get("version")
        tags = {"medgan.kind": "evaluation", "mlflow.source.name": "medgan evaluate"}
        tags.update({f"medgan.{k}": str(v) for k, v in loaded_info.items() if k in ("model_uri", "dataset_hash") and v})
        if source_run:
            tags["medgan.source_run_id"] = source_run
        if name:
            tags.update({"medgan.model_name": name, "medgan.model_version": str(version)})
        source = Path(str(loaded_info.get("checkpoint", "model"))).stem
        run_name = f"eval-{name}-v{version}" if name else f"eval-{source}"
        run = client.create_run(experiment_id, run_name=run_name, tags=tags)
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(_metric_key(k), float(v), now, 0) for k, v in metrics.items()]
        client.log_batch(run.info.run_id, metrics=items)
        if Path(report_dir).is_dir():
            client.log_artifacts(run.info.run_id, str(report_dir), "evaluation")
        if name and version:
            for k, v in metrics.items():
                client.set_model_version_tag(name, str(version), f"eval.{_metric_key(k)}", _fmt(v))
            client.set_model_version_tag(name, str(version), "eval.run_id", run.info.run_id)
        client.set_terminated(run.info.run_id)
        return run.info.run_id
    except (MlflowException, OSError, RuntimeError) as e:
        warnings.warn(
            f"could not record the evaluation in MLflow ({e}); the report in {report_dir} is complete",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


def set_alias(tracking_uri: str, name: str, version: str | int, alias: str) -> None:
    """Point ``models:/NAME@ALIAS`` at `version` (e.g. ``champion`` after the evaluation gates pass).

    Raises:
        ValueError: the model or version does not exist (the message lists what does).
    """
    uri = resolve_uri(tracking_uri)
    check_reachable(uri)
    client = MlflowClient(tracking_uri=uri)
    mv = _model_version(client, f"{name}/{version}")
    client.set_registered_model_alias(name, alias, str(mv.version))


def _version_lines(mv: Any, aliases: dict[str, str]) -> list[str]:
    mine = sorted(a for a, v in aliases.items() if str(v) == str(mv.version))
    created = time.strftime("%Y-%m-%d %H:%M", time.localtime(mv.creation_timestamp / 1000))
    head = f"  v{mv.version}  {created}  run {mv.run_id or '-'}"
    lines = [head + (f"  @{' @'.join(mine)}" if mine else "")]
    tags = dict(mv.tags or {})
    metrics = {k: v for k, v in tags.items() if k.startswith(("metric.", "eval."))}
    other = {k: v for k, v in tags.items() if k not in metrics}
    for k in ("classes", "dataset_hash", "resolution", "medgan_version"):
        if k in other:
            value = other.pop(k)
            lines.append(f"      {k}: {value[:16] if k == 'dataset_hash' else value}")
    train = {k[7:]: v for k, v in metrics.items() if k.startswith("metric.")}
    headline = {k: v for k, v in train.items() if k in HEADLINE_METRICS} or train
    evaluation = {k[5:]: v for k, v in metrics.items() if k.startswith("eval.")}
    # The promotion-relevant evaluation numbers; every metric stays in the tags and the evaluation run.
    evaluation = {k: v for k, v in evaluation.items() if k in EVAL_HEADLINE} or evaluation
    for label, values in (("training", headline), ("evaluation", evaluation)):
        if values:
            lines.append(f"      {label}: " + ", ".join(f"{k}={v}" for k, v in sorted(values.items())))
    lines += [f"      {k}: {v}" for k, v in sorted(other.items()) if k != "run_id"]
    return lines


def describe_models(uri: str) -> str:
    """One paragraph per registered model: versions, aliases and the newest version's headline metrics."""
    client = MlflowClient(tracking_uri=uri)
    check_reachable(uri)
    models = sorted(client.search_registered_models(), key=lambda m: m.name)
    if not models:
        return f"no registered models in {_redact(uri)} (medgan train registers one at the end of training)"
    out = [f"registered models in {_redact(uri)}:"]
    for rm in models:
        versions = sorted(client.search_model_versions(f"name='{rm.name}'"), key=lambda v: int(v.version))
        aliases = dict(rm.aliases or {})
        alias_text = ", ".join(f"@{a} -> v{v}" for a, v in sorted(aliases.items())) or "no aliases"
        out.append(f"{rm.name}: {len(versions)} version(s), {alias_text}")
        if versions:
            out += _version_lines(versions[-1], aliases)
    return "\n".join(out)


def describe_model(uri: str, name: str) -> str:
    """Versions, aliases, tags and metrics of ``NAME`` (every version) or ``NAME@ALIAS`` / ``NAME/VERSION`` (one).

    Raises:
        ValueError: an unknown model, alias or version (the message lists what exists).
    """
    client = MlflowClient(tracking_uri=uri)
    check_reachable(uri)
    model_name, alias, version = _parse_model_ref(name)
    selected = _model_version(client, name)
    rm = client.get_registered_model(model_name)
    aliases = dict(rm.aliases or {})
    if alias is None and version is None:
        versions = sorted(client.search_model_versions(f"name='{model_name}'"), key=lambda v: int(v.version))
    else:
        versions = [selected]
    alias_text = ", ".join(f"@{a} -> v{v}" for a, v in sorted(aliases.items())) or "no aliases"
    out = [f"{model_name} ({alias_text})", f"  load: models:/{model_name}@<alias> or models:/{model_name}/<version>"]
    for mv in versions:
        out += _version_lines(mv, aliases)
    return "\n".join(out)


def experiment_runs(uri: str, experiment: str, metrics: tuple[str, ...]) -> list[dict[str, Any]]:
    """Runs of one experiment, oldest first, with their params and the full history of some metrics.

    Args:
        uri: the tracking URI.
        experiment: the experiment name.
        metrics: metric keys whose histories to fetch, e.g. ``("loss/d", "d/acc_real")``.

    Returns:
        ``[{"run_id", "run_name", "status", "params": {...}, "history": {key: [(step, value), ...]}}]``.

    Raises:
        ValueError: the experiment does not exist (the message lists the ones that do).
    """
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ValueError(f"no experiment {experiment!r} in {_redact(uri)}; experiments: {names}")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"], max_results=1000)
    return [
        {
            "run_id": r.info.run_id,
            "run_name": r.info.run_name,
            "status": r.info.status,
            "params": dict(r.data.params),
            "history": {
                k: [(m.step, m.value) for m in client.get_metric_history(r.info.run_id, _metric_key(k))]
                for k in metrics
            },
        }
        for r in runs
    ]
