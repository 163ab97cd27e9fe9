"""The MLflow run of an evaluation: numeric metrics linked to the evaluated model, the real dataset as its input.

The run lands in the training run's experiment (``medgan-evaluations`` when there is none). Its metrics carry the
evaluated LoggedModel's id and the dataset's name and digest, so the model's page lists them and the UI sorts and
compares them; the model version gets one tag, ``eval.run_id``, pointing at its newest evaluation.

Example:
    >>> run_id = log_evaluation("", loaded.info, {"fd": 12.5, "tstr_trtr_ratio": 0.81}, Path("reports/x"), dataset)
"""

from __future__ import annotations

import contextlib
import math
import numbers
import time
import warnings
from pathlib import Path
from typing import Any

from mlflow.entities import LoggedModelInput, Metric
from mlflow.exceptions import MlflowException

from medgan.tracking import lineage
from medgan.tracking.registry import EVAL_RUN_TAG, logged_model_id
from medgan.tracking.store import connect, experiment_id, metric_key, resolve_uri, short_error

EXPERIMENT = "medgan-evaluations"  # for generators without a training run in the store


def log_evaluation(
    tracking_uri: str,
    loaded_info: dict[str, Any],
    metrics: dict[str, float],
    report_dir: Path,
    dataset: Any = None,
) -> str | None:
    """Record an evaluation as its own MLflow run, linked to the evaluated model version and LoggedModel.

    Args:
        tracking_uri: the store ("" = local default).
        loaded_info: `LoadedGenerator.info` (name, version, run_id, model_uri, checkpoint, dataset_hash; those known).
        metrics: the evaluation's numbers; each becomes a run metric (non-numeric values are skipped).
        report_dir: the evaluation report folder, logged under ``evaluation/``.
        dataset: the real `SliceDataset` evaluated against, logged as the run's input (context ``evaluation``).

    Returns:
        The evaluation run id, or None when the store failed (a warning says why; the local report is unaffected).
    """
    try:
        uri = resolve_uri(tracking_uri)
        client = connect(uri)
        source_run = loaded_info.get("run_id")
        experiment = None
        if source_run:
            with contextlib.suppress(MlflowException):
                experiment = client.get_run(source_run).info.experiment_id
        experiment = experiment or experiment_id(client, EXPERIMENT, uri)
        name, version = loaded_info.get("name"), loaded_info.get("version")
        model_id = None
        if name and version:
            with contextlib.suppress(MlflowException):
                model_id = logged_model_id(client.get_model_version(name, str(version)))
        tags = {"medgan.kind": "evaluation", "mlflow.source.name": "medgan evaluate"}
        tags.update({f"medgan.{k}": str(v) for k, v in loaded_info.items() if k in ("model_uri", "dataset_hash") and v})
        if source_run:
            tags["medgan.source_run_id"] = source_run
        if name:
            tags.update({"medgan.model_name": name, "medgan.model_version": str(version)})
        source = Path(str(loaded_info.get("checkpoint", "model"))).stem
        run = client.create_run(experiment, run_name=f"eval-{name}-v{version}" if name else f"eval-{source}", tags=tags)
        run_id = run.info.run_id

        inputs = [lineage.dataset_input(dataset, "evaluation")] if dataset is not None else []
        models = [LoggedModelInput(model_id)] if model_id else []
        if inputs or models:
            client.log_inputs(run_id, datasets=inputs or None, models=models or None)
        link: dict[str, Any] = {"model_id": model_id}
        if inputs:
            link.update(dataset_name=inputs[0].dataset.name, dataset_digest=inputs[0].dataset.digest)
        now = int(time.time() * 1000)
        items = [Metric(metric_key(k), v, now, 0, **link) for k, v in _numbers(metrics).items()]
        client.log_batch(run_id, metrics=items)
        if Path(report_dir).is_dir():
            client.log_artifacts(run_id, str(report_dir), "evaluation")
        if name and version:
            client.set_model_version_tag(name, str(version), EVAL_RUN_TAG, run_id)
        client.set_terminated(run_id)
        return run_id
    except (MlflowException, OSError, RuntimeError) as e:
        warnings.warn(
            f"could not record the evaluation in MLflow ({short_error(e)}); the report in {report_dir} is complete",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite numeric values of `metrics` (bools and strings are not metrics)."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            continue
        if math.isfinite(float(v)):
            out[k] = float(v)
    return out
