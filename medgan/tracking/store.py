"""The tracking store: one absolute URI, its health, its experiments and their runs, and errors that fit on one line.

Example:
    >>> uri = resolve_uri("")  # "sqlite:///<cwd>/mlflow.db"
    >>> check_reachable("http://mlflow-host:5000")  # RuntimeError naming the server and the ways out when it is down
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; start concurrent runs on a new store one after the other there
    fcntl = None

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

HEALTH_TIMEOUT_S = 3.0  # one /health request
HEALTH_WAIT_S = 3.0  # an unreachable server fails a command this fast


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (as written: relative or absolute), or None for another store."""
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


def resolve_uri(uri: str | None, cwd: Path | None = None) -> str:
    """One absolute tracking URI: `uri` made absolute, or ``sqlite:///<cwd>/mlflow.db`` when empty.

    Args:
        uri: a tracking URI (``http(s)://...``, ``sqlite:///...``, ``file:...``, ``postgresql://...``), a path to a
            ``.db`` file or a folder, or ""/None for the local default.
        cwd: the folder relative URIs are resolved against (default: the current directory).

    Returns:
        An absolute URI; ``sqlite:///`` stores keep their artifacts in ``mlartifacts/`` beside the database.

    Example:
        >>> resolve_uri("runs/x.db", Path("/proj"))
        'sqlite:////proj/runs/x.db'
    """
    base = Path(cwd or Path.cwd()).resolve()
    uri = (uri or "").strip()
    if not uri:
        return f"sqlite:///{base / 'mlflow.db'}"
    path = sqlite_path(uri)
    if path is not None:
        return f"sqlite:///{path if path.is_absolute() else (base / path).resolve()}"
    if uri.startswith("file:"):
        path = Path(urllib.parse.urlparse(uri).path)
        return (path if path.is_absolute() else base / path).resolve().as_uri()
    if "://" in uri:
        return uri.rstrip("/")
    path = (base / uri).resolve()
    return f"sqlite:///{path}" if path.suffix == ".db" else path.as_uri()


def is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def redact(uri: str) -> str:
    """The URI without a password, for params and messages."""
    try:
        parts = urllib.parse.urlsplit(uri)
        if parts.password is None:
            return uri
    except ValueError:
        return uri
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.username}:***@{parts.hostname}:{parts.port or ''}"))


def short_error(e: BaseException, limit: int = 240) -> str:
    """The first line of an error, cut to `limit` characters (MLflow's HTTP errors carry whole response bodies)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def health(uri: str, timeout_s: float = HEALTH_TIMEOUT_S) -> str | None:
    """One ``GET <uri>/health``: None when it answers 200, else why not; stores that are not servers are healthy."""
    if not is_http(uri):
        return None
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=timeout_s) as r:
            return None if r.status == 200 else f"HTTP {r.status}"
    except (OSError, urllib.error.URLError) as e:
        return str(e)


def wait_for_server(uri: str, timeout_s: float, proc: subprocess.Popen | None = None) -> str | None:
    """Poll ``<uri>/health`` every 0.5 s until it answers 200 (returns None), `timeout_s` passes, or `proc` (the
    server's process, when this caller started it) exits; then returns why not, in one line."""
    deadline = time.monotonic() + timeout_s
    while True:
        error = health(uri)
        if error is None:
            return None
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
    error = wait_for_server(uri, HEALTH_WAIT_S) if is_http(uri) else None
    if error is not None:
        raise RuntimeError(
            f"MLflow tracking server {redact(uri)} is unreachable ({error}). "
            "Start it (mlflow server ...), fix --tracking-uri / MLFLOW_TRACKING_URI, or run with --no-track."
        )


def api_error(uri: str, e: BaseException) -> RuntimeError:
    """The one-line error for a store whose API fails (a server that answers /health but not its REST API)."""
    where = (
        f"MLflow tracking server {redact(uri)} answers /health but its API failed"
        if is_http(uri)
        else (f"MLflow store {redact(uri)} failed")
    )
    return RuntimeError(
        f"{where} ({short_error(e)}). Check the server's log and its backend store, fix --tracking-uri / "
        "MLFLOW_TRACKING_URI, or run with --no-track."
    )


def connect(uri: str) -> MlflowClient:
    """A client for a reachable store: /health answered and one API call made.

    Raises:
        RuntimeError: the server is unreachable, or it answers /health but its API fails (one line, no traceback).
    """
    check_reachable(uri)
    try:
        client = new_client(uri)
        client.search_experiments(max_results=1)
    except (MlflowException, OSError) as e:
        raise api_error(uri, e) from None
    return client


def new_client(uri: str) -> MlflowClient:
    """An MlflowClient on `uri`, created under a lock beside a sqlite store.

    Creating the client creates or migrates a sqlite store's schema; two processes starting on a new ``mlflow.db`` at
    once would both migrate it and the second would fail ("Online migration expected to match one row", "duplicate
    column name"). The lock is ``<db>.lock`` beside the database; a store whose folder is read-only goes without it
    (nothing is migrated there).

    Args:
        uri: an absolute tracking URI (`resolve_uri`).

    Returns:
        The client, with the registry on the same URI.
    """
    with _sqlite_init_lock(uri):
        return MlflowClient(tracking_uri=uri, registry_uri=uri)


@contextlib.contextmanager
def _sqlite_init_lock(uri: str):
    path = sqlite_path(uri)
    if path is None or fcntl is None:
        yield
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_name(path.name + ".lock"), "a")  # noqa: SIM115  # closed below
    except OSError:
        yield
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def artifact_root(uri: str, experiment: str) -> str | None:
    """Artifact location of a new experiment: ``mlartifacts/<experiment>`` beside a SQLite file, else the server's."""
    path = sqlite_path(uri)
    return None if path is None else (path.parent / "mlartifacts" / re.sub(r"[^\w.-]", "_", experiment)).as_uri()


def experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    """The id of experiment `name`, created (artifacts beside a SQLite store) when it does not exist.

    Raises:
        RuntimeError: the experiment is deleted (the message says how to restore it).
    """
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            raise RuntimeError(f"MLflow experiment {name!r} is deleted; restore it (mlflow experiments restore)")
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_root(uri, name))
    except MlflowException:  # another process created it first
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def metric_key(name: str) -> str:
    """`name` with the characters MLflow rejects in metric keys replaced by ``_``."""
    return re.sub(r"[^0-9A-Za-z_\-./ ]", "_", name)


def experiment_runs(uri: str, experiment: str, metrics: tuple[str, ...]) -> list[dict[str, Any]]:
    """Runs of one experiment, oldest first, with their params and the full history of some metrics.

    Args:
        uri: the tracking URI.
        experiment: the experiment name.
        metrics: metric keys whose histories to fetch, e.g. ``("loss/d", "d/acc_real")``.

    Returns:
        ``[{"run_id", "run_name", "status", "params": {...}, "history": {key: [(step, value), ...]}}]``, each history
        in step order.

    Raises:
        ValueError: the experiment does not exist (the message lists the ones that do).
    """
    client = new_client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ValueError(f"no experiment {experiment!r} in {redact(uri)}; experiments: {names}")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"], max_results=1000)
    return [
        {
            "run_id": r.info.run_id,
            "run_name": r.info.run_name,
            "status": r.info.status,
            "params": dict(r.data.params),
            "history": {
                k: sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, metric_key(k)))
                for k in metrics
            },
        }
        for r in runs
    ]
