"""The MLflow run of a training: params, stepped metrics and images, lineage, the registered generator, and outages.

A `Tracker` is built from ``cfg.track`` (no network) and started by the training loop on rank 0. A tracking failure
never stops training: the call is kept, and everything kept is logged, in order, at the first call after the store
answers again (a ``/health`` probe at most once per `probe_interval_s`). What the store refuses outright, or what is
still kept when the run ends and the store has not come back within `finish_wait_s`, is named in one warning and, when
the store can take it, in the run tag ``medgan.tracking.missing``.

Example:
    >>> tracker = Tracker(cfg.track)
    >>> tracker.start(cfg, SliceDataset.open("datasets/brain"), run_name="brain-gpu-1a2b3c")
    >>> tracker.log_metrics({"loss/d": 0.7}, step=4096)
    >>> tracker.register_generator(G_ema, cfg, classes, dataset_hash, {"loss/g": 1.2})  # "models:/medgan-brain/1"
    >>> tracker.finish()
"""

from __future__ import annotations

import collections
import contextlib
import copy
import shlex
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from medgan import __version__
from medgan.config import Config, TrackConfig, dump_yaml, flatten, to_dict
from medgan.tracking import lineage, pyfunc, registry
from medgan.tracking.store import (
    api_error,
    connect,
    experiment_id,
    health,
    is_http,
    metric_key,
    new_client,
    redact,
    resolve_uri,
    short_error,
)

MISSING_TAG = "medgan.tracking.missing"


def _fmt(value: float) -> str:
    return f"{float(value):.6g}"


class Tracker:
    """One MLflow run. Logging calls never raise into the training loop; an outage is caught up when it ends.

    Args:
        track: the ``track`` config section (store, experiment, registered model, system metrics).
        finish_wait_s: how long `finish` waits for a store that is down before it gives up on what is kept.

    Attributes:
        uri: the absolute tracking URI.
        client: the MLflow client of that store.
        run_id, experiment_id: the run, once started.
        model_uri: ``models:/<name>/<version>`` once the generator is registered.
    """

    probe_interval_s = 1.0  # while the store is down, at most one /health probe (or retry) this often
    max_kept = 10_000  # calls kept during an outage; older ones are dropped (and named) beyond this

    def __init__(self, track: TrackConfig, *, finish_wait_s: float = 30.0):
        self.uri = resolve_uri(track.tracking_uri)
        self.track = track
        self.finish_wait_s = finish_wait_s
        self.client = new_client(self.uri)
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.registered_model = track.registered_model
        self.model_uri: str | None = None
        self.geometry: dict[str, Any] = {}  # the training data's spacing_mm / modality, stored with the model
        self._params: dict[str, str] = {}  # logged so far: MLflow rejects a changed value for a logged key
        self._kept: collections.deque[tuple[str, Callable[[], Any]]] = collections.deque()
        self._lost: list[str] = []  # refused by the store, or dropped from a full queue
        self._down = False
        self._last_try = 0.0
        self._monitor: Any = None
        self._logged: Any = None  # the generator's LoggedModel, once uploaded
        self._finished = False

    # Start.

    def start(self, cfg: Config, dataset: Any, run_name: str, *, resume_run_id: str | None = None) -> None:
        """Start the run (or continue `resume_run_id` when the store has it) and log config, versions and lineage.

        Args:
            cfg: the resolved config, logged flattened as params and as ``config.yaml``.
            dataset: the training `SliceDataset`.
            run_name: the MLflow run name (``<dataset>-<preset>-<short id>``).
            resume_run_id: the run of the checkpoint a resumed training continues.

        Raises:
            RuntimeError: the store is unreachable or its API fails (one line naming it and the ways out).
        """
        self.client = connect(self.uri)
        name = str(dataset.meta.get("name") or Path(dataset.path).name)
        commit = lineage.git_commit()
        tags = {
            "medgan.dataset": name,
            "medgan.dataset_hash": dataset.content_hash,
            "mlflow.source.name": "medgan train",
        }
        if commit:
            tags["mlflow.source.git.commit"] = commit
        try:
            exp = experiment_id(self.client, self.track.experiment or f"medgan-{name}", self.uri)
            run = None
            if resume_run_id:
                with contextlib.suppress(MlflowException):
                    run = self.client.get_run(resume_run_id)
                    self.client.update_run(run.info.run_id, status="RUNNING")
                if run is None:
                    tags["medgan.resumed_from_run"] = resume_run_id
            if run is None:
                run = self.client.create_run(exp, run_name=run_name, tags=tags)
        except (MlflowException, OSError) as e:
            raise api_error(self.uri, e) from None
        self.run_id, self.experiment_id = run.info.run_id, run.info.experiment_id
        self._params = dict(run.data.params)
        self.registered_model = self.track.registered_model or f"medgan-{name}"
        self.geometry = dataset.geometry()  # spacing/modality travel with the registered model (exports state them)
        if self.track.system_metrics:
            self._monitor = _system_monitor(self.run_id, self.uri, resumed=bool(run.data.params))
        params = flatten(cfg)
        params.update(
            {
                "track.resolved_uri": self.uri,
                "dataset.name": name,
                "dataset.content_hash": dataset.content_hash,
                "dataset.classes": ",".join(dataset.classes),
                "dataset.n_slices": str(len(dataset)),
                **lineage.environment_params(cfg.train.device),
            }
        )
        self.log_params(params)
        shown = copy.deepcopy(cfg)
        shown.track.tracking_uri = redact(shown.track.tracking_uri)
        text = dump_yaml(shown)
        self._call("log_text", lambda: self.client.log_text(self.run_id, text, "config.yaml"))
        train_input = lineage.dataset_input(dataset, "train")
        self._call("log_inputs", lambda: self.client.log_inputs(self.run_id, [train_input]))

    # Logging.

    def log_params(self, params: dict[str, str]) -> None:
        """Log params once; a changed value for a logged key is kept at its first value (with a warning)."""
        fresh, changed = {}, []
        for k, v in params.items():
            v = redact(str(v))[:6000]
            if k not in self._params:
                fresh[k] = v
            elif self._params[k] != v:
                changed.append(k)
        if changed:
            warnings.warn(f"MLflow params cannot change within a run; kept the first values of {changed}", stacklevel=2)
        if not fresh:
            return
        self._params.update(fresh)  # kept during an outage, so not offered again
        items = [Param(k, v) for k, v in fresh.items()]
        self._call("log_params", lambda: self.client.log_batch(self.run_id, params=items, synchronous=True))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)  # the time of the measurement, also when an outage delays the upload
        items = [Metric(metric_key(k), float(v), now, int(step)) for k, v in metrics.items()]
        self._call("log_metrics", lambda: self.client.log_batch(self.run_id, metrics=items, synchronous=True))

    def log_image(self, image: np.ndarray, name: str, step: int) -> None:
        """Log a uint8 image (H, W) or (H, W, 3) under key `name` at `step`: an image card with a step slider."""
        img, key, now = np.array(image, copy=True), metric_key(name), int(time.time() * 1000)
        self._call("log_image", lambda: self.client.log_image(self.run_id, img, key=key, step=int(step), timestamp=now))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        log = self.client.log_artifacts if path.is_dir() else self.client.log_artifact
        self._call("log_artifact", lambda: log(self.run_id, str(path), artifact_path))

    def set_tags(self, tags: dict[str, Any]) -> None:
        items = [RunTag(k, str(v)[:5000]) for k, v in tags.items()]
        self._call("set_tags", lambda: self.client.log_batch(self.run_id, tags=items, synchronous=True))

    def register_generator(
        self, G_ema: Any, cfg: Config, classes: list[str], dataset_hash: str, metrics: dict[str, float], step: int = 0
    ) -> str | None:
        """Log the EMA generator as a pyfunc model, register it, and give the new version alias ``candidate``.

        Args:
            G_ema: the EMA generator, the plain module (not a DDP or torch.compile wrapper); a CPU copy is taken.
            cfg: the resolved config (its ``model`` section rebuilds the network).
            classes: class names, index = label.
            dataset_hash: the training dataset's content hash.
            metrics: the final metrics: on the LoggedModel at `step`, and ``metric.<name>`` version tags.
            step: images seen when the generator was taken.

        Returns:
            ``models:/<name>/<version>``, or None when it is kept for later (the store is down) or refused (a
            warning says why).
        """
        G = G_ema
        if G.num_classes != len(classes) or G.z_dim != cfg.model.z_dim:
            error = ValueError(
                f"generator has {G.num_classes} classes and z_dim {G.z_dim} but the config/classes say "
                f"{len(classes)} and {cfg.model.z_dim}"
            )
            self._refused("register_generator", error)
            return None
        G = copy.deepcopy(G).float().cpu().eval()  # training may go on (or end) before a kept registration runs
        info = {
            "model": to_dict(cfg.model),
            "classes": list(classes),
            "dataset_hash": dataset_hash,
            "resolution": 128,
            "medgan_version": __version__,
            **self.geometry,
        }
        return self._call("register_generator", lambda: self._register(G, info, dict(metrics), int(step)))

    def _register(self, G: Any, info: dict[str, Any], metrics: dict[str, float], step: int) -> str:
        if self._logged is None:  # a retry after an outage does not log the model twice
            self._logged = pyfunc.log_generator(self.client, self.experiment_id, self.run_id, G, info, step)
        logged = self._logged
        now = int(time.time() * 1000)
        linked = [Metric(metric_key(k), float(v), now, step, model_id=logged.model_id) for k, v in metrics.items()]
        if linked:  # the LoggedModel page shows the metrics it was registered with
            self.client.log_batch(self.run_id, metrics=linked, synchronous=True)
        tags = {
            "dataset_hash": info["dataset_hash"],
            "run_id": self.run_id,
            "resolution": "128",
            "classes": ",".join(info["classes"]),
            "medgan_version": __version__,
            **{f"metric.{metric_key(k)}": _fmt(v) for k, v in metrics.items()},
        }
        version = registry.register_version(self.client, self.registered_model, logged, self.run_id, tags)
        self.model_uri = f"models:/{self.registered_model}/{version.version}"
        self.client.set_tag(self.run_id, "medgan.model_uri", self.model_uri)
        return self.model_uri

    # Outages.

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run one call now, or keep it (in order) while the store is down; returns its result or None."""
        if self._kept and not self._catch_up():
            self._keep(what, fn)
            return None
        try:
            return fn()
        except Exception as e:  # a tracking failure must never stop training
            if not self._store_down():
                self._refused(what, e)
                return None
            self._keep(what, fn)
            self._last_try = time.monotonic()
            if not self._down:
                self._down = True
                warnings.warn(
                    f"MLflow {what} failed for run {self.run_id} at {redact(self.uri)}: {short_error(e)}. Training "
                    "continues; what cannot be logged now is kept and logged as soon as the store answers again.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return None

    def _store_down(self) -> bool:
        """Whether the store is down (a failure then is an outage: retry later) rather than refusing one request
        (never retried): ``/health`` fails for a server, or a cheap read fails for any store."""
        if health(self.uri) is not None:
            return True
        try:
            self.client.search_experiments(max_results=1)
        except Exception:
            return True
        return False

    def _keep(self, what: str, fn: Callable[[], Any]) -> None:
        self._kept.append((what, fn))
        if len(self._kept) > self.max_kept:
            self._lost.append(f"{self._kept.popleft()[0]} (dropped: more than {self.max_kept} calls kept)")

    def _refused(self, what: str, e: Exception) -> None:
        self._lost.append(f"{what} ({short_error(e, 160)})")
        warnings.warn(
            f"MLflow {what} failed for run {self.run_id}: {short_error(e)}; it is not logged",
            RuntimeWarning,
            stacklevel=4,
        )

    def _catch_up(self) -> bool:
        """Log what was kept, oldest first, once the store answers; True when nothing is kept any more."""
        now = time.monotonic()
        if now - self._last_try < self.probe_interval_s:
            return False
        self._last_try = now
        if self._store_down():
            return False
        n = 0
        while self._kept:
            what, fn = self._kept[0]
            try:
                fn()
                n += 1
            except Exception as e:
                if self._store_down():
                    return False
                self._refused(what, e)
            self._kept.popleft()
        if self._down:
            self._down = False
            warnings.warn(
                f"MLflow at {redact(self.uri)} answers again: the {n} call(s) kept for run {self.run_id} are logged",
                RuntimeWarning,
                stacklevel=4,
            )
        return True

    def missing(self) -> list[str]:
        """What the store has not got: calls still kept (the store is down) and calls it refused."""
        kept = collections.Counter(what for what, _ in self._kept)
        return [f"{n} x {what} (store unreachable)" for what, n in kept.items()] + list(self._lost)

    # End.

    def finish(self, status: str = "FINISHED") -> None:
        """Catch up (waiting up to `finish_wait_s` for a store that is down), then end the run with `status`.

        What the store still lacks is named in one warning and, when it answers, in the ``medgan.tracking.missing``
        tag. Safe to call twice.
        """
        if self._finished or self.run_id is None:
            return
        self._finished = True
        if self._monitor is not None:
            with contextlib.suppress(Exception):
                self._monitor.finish()
        deadline = time.monotonic() + self.finish_wait_s
        while self._kept and not self._catch_up() and time.monotonic() < deadline:
            time.sleep(self.probe_interval_s / 4)
        missing = self.missing()
        if self._kept:
            warnings.warn(
                f"MLflow at {redact(self.uri)} did not answer by the end of run {self.run_id}; not logged: "
                f"{'; '.join(missing)}. The run stays RUNNING in MLflow; the run folder's checkpoints hold the "
                "trained generator (medgan export/evaluate take a checkpoint path).",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        if missing:
            warnings.warn(
                f"run {self.run_id} ends without: {'; '.join(missing)} (tag {MISSING_TAG})",
                RuntimeWarning,
                stacklevel=2,
            )
            self._call("set_tags", lambda: self.client.set_tag(self.run_id, MISSING_TAG, "; ".join(missing)[:5000]))
        self._call("finish", lambda: self.client.set_terminated(self.run_id, status))

    def ui_command(self) -> str:
        """The command that shows this run in the MLflow UI (the server URL for http stores)."""
        if is_http(self.uri):
            return f"open {redact(self.uri)}/#/experiments/{self.experiment_id}/runs/{self.run_id}"
        return f"mlflow ui --backend-store-uri {shlex.quote(self.uri)}"


def _system_monitor(run_id: str, uri: str, resumed: bool) -> Any:
    """MLflow's CPU/memory/GPU sampler for the run, or None without psutil."""
    try:
        import psutil  # noqa: F401
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, resume_logging=resumed, tracking_uri=uri)
        monitor.start()
    except Exception:  # system metrics are a nicety: never a reason not to train
        return None
    return monitor
