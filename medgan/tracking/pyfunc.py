"""The registered model's package: models-from-code (`model_code.py`), its signature and its pinned requirements.

`log_generator` writes the EMA generator as two plain artifacts (``generator.pt`` state_dict, ``generator.json``
config) plus the network code, packages them as an MLflow pyfunc model whose ``python_model`` is the file
`model_code.py` (nothing is cloudpickled), and logs it as an MLflow 3 LoggedModel output of the training run.

Example:
    >>> logged = log_generator(client, experiment_id, run_id, G_ema, info)  # info: model, classes, dataset_hash
    >>> logged.model_uri  # "models:/m-..."; registry.register_version gives it a name, a version and an alias
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.entities import LoggedModel, LoggedModelOutput, LoggedModelStatus
from mlflow.models import Model
from mlflow.models.signature import ModelSignature
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

MODEL_NAME = "generator"  # name of the logged model inside the run
MODEL_CODE = Path(__file__).with_name("model_code.py")
# What the model imports when it runs, pinned to the versions in this environment (torch without its +cpu/+cuXXX
# build label, which only the PyTorch index serves).
PINNED = ("mlflow", "torch", "numpy", "pandas", "PyYAML")


def signature() -> ModelSignature:
    """``label`` column (class name or index, as a string) in, float32 [n, 1, 128, 128] out, ``seed`` param."""
    return ModelSignature(
        inputs=Schema([ColSpec("string", "label")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1, 128, 128))]),
        params=ParamSchema([ParamSpec("seed", "long", 0)]),
    )


def requirements() -> list[str]:
    """``name==version`` for each package the served model imports, as installed here (what it was trained with)."""
    out = []
    for dist in PINNED:
        try:
            out.append(f"{dist}=={re.sub(r'[+].*$', '', version(dist))}")
        except PackageNotFoundError:
            continue
    return out


def code_bundle(dst: Path) -> Path:
    """Copy the part of medgan the model imports (``__init__``, ``config``, ``config_rules``, ``models/``) to
    ``dst/medgan``."""
    import medgan

    src, pkg = Path(medgan.__file__).parent, dst / "medgan"
    shutil.copytree(src / "models", pkg / "models", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("__init__.py", "config.py", "config_rules.py"):
        shutil.copy2(src / name, pkg / name)
    return dst


def save_generator(path: Path, G: Any, info: dict[str, Any], mlflow_model: Model | None = None) -> Path:
    """Write the generator as a pyfunc model folder at `path` (which must not exist or be empty).

    Args:
        path: the model folder to write.
        G: the plain (unwrapped) generator module.
        info: ``generator.json``: ``model`` (ModelConfig fields), ``classes``, ``dataset_hash``, geometry, version.
        mlflow_model: the MLmodel metadata (run and logged-model ids) when the folder is logged.
    """
    import pandas as pd
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        weights, config = Path(tmp) / "generator.pt", Path(tmp) / "generator.json"
        torch.save({k: v.detach().float().cpu() for k, v in G.state_dict().items()}, weights)
        config.write_text(json.dumps(info, indent=2))
        classes = list(info["classes"])
        mlflow.pyfunc.save_model(
            path=str(path),
            python_model=str(MODEL_CODE),
            artifacts={"weights": str(weights), "config": str(config), "code": str(code_bundle(Path(tmp) / "code"))},
            signature=signature(),
            input_example=(pd.DataFrame({"label": [classes[0], classes[-1]]}), {"seed": 0}),
            pip_requirements=requirements(),
            mlflow_model=mlflow_model,
        )
    for pycache in Path(path).rglob("__pycache__"):  # saving loads the model once
        shutil.rmtree(pycache, ignore_errors=True)
    return Path(path)


def log_generator(
    client: MlflowClient, experiment_id: str, run_id: str, G: Any, info: dict[str, Any], step: int = 0
) -> LoggedModel:
    """Log the generator as a LoggedModel of run `run_id`: create it, upload the package, link it, mark it ready.

    Args:
        client: a client of the run's store.
        experiment_id: the run's experiment (the logged model lands there).
        run_id: the training run; the model becomes its output at `step`.
        G: the plain (unwrapped) generator module.
        info: what `save_generator` writes to ``generator.json``.
        step: the run step (images seen) the model belongs to.

    Returns:
        The READY `LoggedModel` (``model_uri`` is ``models:/<model_id>``).
    """
    logged = client.create_logged_model(
        experiment_id,
        name=MODEL_NAME,
        source_run_id=run_id,
        tags={"dataset_hash": str(info.get("dataset_hash", ""))},
        model_type="generator",
    )
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=int(step))])
    meta = Model(
        artifact_path=logged.artifact_location, model_uuid=logged.model_id, run_id=run_id, model_id=logged.model_id
    )
    with tempfile.TemporaryDirectory() as tmp:
        local = save_generator(Path(tmp) / "model", G, info, meta)
        client.log_model_artifacts(logged.model_id, str(local))
    return client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
