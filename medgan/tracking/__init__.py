"""MLflow tracking and the model registry: the only package that imports mlflow (importing it alone imports nothing).

One module per concept; import what you use from it:

- `medgan.tracking.store`: the tracking URI, its health, experiments, one-line store errors.
- `medgan.tracking.null`: the tracker interface and `NullTracker` (no MLflow import).
- `medgan.tracking.runs`: `Tracker`, the MLflow run of a training, and how it rides out an outage.
- `medgan.tracking.lineage`: datasets as run inputs, versions and commit as params.
- `medgan.tracking.pyfunc`: the registered model's package (models-from-code), signature, pinned requirements.
- `medgan.tracking.model_code`: the file MLflow runs to serve the generator (never imported by medgan).
- `medgan.tracking.registry`: versions and aliases, and `load_generator`, the one way to load a generator.
- `medgan.tracking.evaluation`: the MLflow run of an evaluation.

Example:
    >>> from medgan.tracking.registry import load_generator
    >>> loaded = load_generator("models:/medgan-brain@champion")
"""
