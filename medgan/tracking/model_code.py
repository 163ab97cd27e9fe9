"""The registered generator as MLflow runs it (models-from-code): copied into the model and executed on load.

It is never imported by medgan itself (MLflow executes it, and `set_model` at the bottom names the model). Its own
imports are MLflow's and numpy's; medgan's network code is imported in `load_context`: the installed medgan when there
is one, else the copy of ``medgan/{__init__,config}.py`` and ``medgan/models/`` shipped as the ``code`` artifact,
appended to ``sys.path`` so it never shadows an installed medgan.

Input: a ``label`` column of class names (or index strings), in any of MLflow's scoring formats (CSV,
``dataframe_split``, ``dataframe_records``, ``inputs``, ``instances``); param ``seed`` (default 0). Output: float32
[n, 1, 128, 128] in [-1, 1]; image j of a request uses seed ``seed + j``, so a request gives the same pixels anywhere.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd


class GeneratorModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper of a `LoadedGenerator`: labels + ``seed`` -> float32 images [n, 1, 128, 128]."""

    def load_context(self, context) -> None:
        if importlib.util.find_spec("medgan") is None:
            sys.path.append(context.artifacts["code"])
        import torch

        import medgan
        from medgan.models.generator import LoadedGenerator

        meta = json.loads(Path(context.artifacts["config"]).read_text())
        trained = meta.get("medgan_version")
        if trained and medgan.__version__ != trained:
            warnings.warn(
                f"this generator was trained with medgan {trained}; medgan {medgan.__version__} is installed and "
                "rebuilds it (uninstall it to use the code shipped with the model)",
                stacklevel=2,
            )
        state = torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True)
        info = {k: meta.get(k) for k in ("dataset_hash", "spacing_mm", "modality")}
        self.loaded = LoadedGenerator.from_state_dict(meta["model"], meta["classes"], state, info)

    # A DataFrame hint: MLflow validates the input by the signature and parses every scoring format into a frame.
    def predict(self, context, model_input: pd.DataFrame, params=None):
        from medgan.models.generator import generate

        labels = [self.loaded.class_index(_label(v)) for v in _labels(model_input)]
        seed = int((params or {}).get("seed", 0))
        return generate(self.loaded.G, labels, [seed + j for j in range(len(labels))])


def _labels(model_input) -> list:
    """The ``label`` values of a DataFrame, a dict of columns, or a plain list/array of labels."""
    if hasattr(model_input, "columns"):
        column = model_input["label"] if "label" in model_input.columns else model_input.iloc[:, 0]
    elif isinstance(model_input, dict):
        column = model_input["label"] if "label" in model_input else next(iter(model_input.values()))
    else:
        column = model_input
    return list(np.asarray(column).reshape(-1))


def _label(value) -> str | int:
    """A class name as given, an index as int (JSON numbers, numpy integers and "0"-like strings all arrive here)."""
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, (int, np.integer)) or (isinstance(value, float) and float(value).is_integer()):
        return int(value)
    return str(value)


mlflow.models.set_model(GeneratorModel())
