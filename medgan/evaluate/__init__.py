"""`medgan evaluate`: offline quality, downstream utility and privacy of a generator, with a promotion gate.

Three entry points, each a layer on the next:

- `run_evaluate` resolves a model reference (registry, run, checkpoint, or an exported synthetic dataset), evaluates it,
  records the evaluation in MLflow and, with ``promote``, moves alias ``champion`` when every gate passes.
- `evaluate_generator` samples ``eval.n_per_class`` images per class from a `LoadedGenerator` and evaluates them.
- `evaluate_images` is the core: synthetic images + the labels they were asked for, against a real slice dataset.

No network access and no ImageNet weights: every feature comes from a domain CNN trained on the real train split
(`medgan.evaluate.features`). All of it runs on the CPU.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medgan.config import Config
from medgan.evaluate.gates import EvalResult, GateResult, check_gates
from medgan.evaluate.scoring import evaluate_images

if TYPE_CHECKING:
    from medgan.dataset import SliceDataset

__all__ = ["EvalResult", "GateResult", "check_gates", "evaluate_generator", "evaluate_images", "run_evaluate"]


def sample_for_evaluation(loaded: Any, cfg: Config) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The images evaluation scores: ``eval.n_per_class`` per class under the seed rule of `medgan.sampling`.

    Image ``index`` of class ``label`` uses seed ``eval.seed + label * 1_000_000 + index`` in class-pure batches of
    ``eval.batch_size``: the image `medgan export` writes for that (class, index) with ``export.seed = eval.seed`` and
    the same batch size.

    Returns:
        (images float32 [C * n, 1, 128, 128], labels int64, seeds int64), class-major.
    """
    from medgan.sampling import sample_classes

    ev = cfg.eval
    return sample_classes(loaded.G, range(len(loaded.classes)), ev.n_per_class, ev.seed, "cpu", ev.batch_size)


def evaluate_generator(
    loaded: Any, dataset: SliceDataset, cfg: Config, out_dir: Path, *, cache_dir: Path | None = None
) -> EvalResult:
    """Sample ``cfg.eval.n_per_class`` images per class from a generator and evaluate them (`evaluate_images`).

    Args:
        loaded: a `medgan.models.generator.LoadedGenerator` (its classes must equal the dataset's, in order).
        dataset: the real slice dataset.
        cfg: the resolved config.
        out_dir: the report folder.
        cache_dir: domain-network cache root.

    Raises:
        ValueError: the generator's classes differ from the dataset's.
    """
    if list(loaded.classes) != dataset.classes:
        raise ValueError(
            f"the generator knows classes {loaded.classes} but {dataset.path} has {dataset.classes}; evaluate "
            "against the dataset it was trained on"
        )
    t = time.perf_counter()
    images, labels, seeds = sample_for_evaluation(loaded, cfg)
    notes = [
        f"{len(images)} images generated in {time.perf_counter() - t:.1f} s: image i of class c from seed "
        f"{cfg.eval.seed} + c * 1000000 + i (batches of {cfg.eval.batch_size}), the images `medgan export "
        f"--seed {cfg.eval.seed} --set export.batch_size={cfg.eval.batch_size}` writes"
    ]
    if loaded.info.get("dataset_hash") and loaded.info["dataset_hash"] != dataset.content_hash:
        notes.append(
            f"the generator was trained on dataset {str(loaded.info['dataset_hash'])[:12]} but evaluated against "
            f"{dataset.content_hash[:12]} ({dataset.path}): the memorization check uses this dataset's train split"
        )
    name = loaded.info.get("name") or Path(str(loaded.info.get("checkpoint", "generator"))).stem
    version = f" v{loaded.info['version']}" if loaded.info.get("version") else ""
    title = f"Evaluation of {name}{version}"
    result = evaluate_images(images, labels, dataset, cfg, out_dir, title=title, cache_dir=cache_dir, notes=notes)
    result.info = dict(loaded.info)
    return result


def _exported(ref: str) -> SliceDataset | None:
    from medgan.dataset import SliceDataset

    path = Path(ref)
    if not (path / "dataset.json").is_file():
        return None
    ds = SliceDataset.open(path)
    if not ds.synthetic:
        raise ValueError(
            f"{path} is a real dataset (synthetic: false); --model takes a generator or an exported synthetic dataset"
        )
    return ds


def _map_labels(syn: SliceDataset, real: SliceDataset) -> np.ndarray:
    unknown = sorted(set(syn.classes) - set(real.classes))
    if unknown:
        raise ValueError(f"{syn.path} has classes {unknown} that {real.path} lacks (it has {real.classes})")
    lookup = np.array([real.classes.index(c) for c in syn.classes])
    return lookup[syn.labels]


def run_evaluate(
    cfg: Config,
    model_ref: str,
    data: Path,
    *,
    out_dir: Path | None = None,
    promote: bool = False,
    cache_dir: Path | None = None,
) -> EvalResult:
    """Evaluate a generator (or an exported synthetic dataset) against a real slice dataset; optionally promote it.

    Args:
        cfg: the resolved config (``cfg.eval``: budgets, thresholds, gates; ``cfg.track.tracking_uri``: the store).
        model_ref: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/RUN_ID``, a run id, a checkpoint file
            or run folder, or an exported synthetic dataset folder (``dataset.json`` with ``synthetic: true``).
        data: the real slice dataset the generator was trained on.
        out_dir: the report folder (default ``reports/<model name or checkpoint stem>[-v<version>]``).
        promote: move alias ``champion`` to the evaluated model version when every gate passes.
        cache_dir: domain-network cache root (default ``cfg.eval.cache_dir`` or ``~/.cache/medgan``).

    Returns:
        An EvalResult; ``promoted`` says whether ``champion`` moved, ``gates`` say which failed.

    Raises:
        ValueError: a synthetic `data`, an unknown model, mismatched classes, or ``promote`` for something that is not
            a registered model version.
        FileNotFoundError: `data` or a checkpoint does not exist.

    Example:
        >>> r = run_evaluate(load_config(), "models:/medgan-brain@candidate", Path("datasets/brain"), promote=True)
        >>> print(r.summary())
    """
    from medgan.dataset import SliceDataset

    dataset = SliceDataset.open(data)
    if dataset.synthetic:
        raise ValueError(
            f"--data {data} is a synthetic dataset; evaluate against the real dataset the generator learned from"
        )
    exported = _exported(model_ref)
    if exported is not None:
        if promote:
            raise ValueError(
                f"--promote needs a registered model; {model_ref} is an exported dataset (use its models:/ reference)"
            )
        out_dir = Path(out_dir) if out_dir else Path("reports") / exported.path.name
        generator = dict(exported.meta.get("generator") or {})
        note = f"exported dataset {exported.path} (generator {generator.get('model_uri', 'unknown')}): no registry step"
        result = evaluate_images(
            np.asarray(exported.images),
            _map_labels(exported, dataset),
            dataset,
            cfg,
            out_dir,
            title=f"Evaluation of exported dataset {exported.path.name}",
            cache_dir=cache_dir,
            notes=[note],
        )
        result.model_ref, result.info = model_ref, generator
        return result
    from medgan.tracking.registry import load_generator

    loaded = load_generator(model_ref, cfg.track.tracking_uri)
    name, version = loaded.info.get("name"), loaded.info.get("version")
    if promote and not (name and version):
        raise ValueError(
            f"--promote needs a registered model version; {model_ref} is not one (use models:/NAME@candidate)"
        )
    stem = name or Path(str(loaded.info.get("checkpoint", model_ref))).stem
    out_dir = Path(out_dir) if out_dir else Path("reports") / (f"{stem}-v{version}" if version else stem)
    result = evaluate_generator(loaded, dataset, cfg, out_dir, cache_dir=cache_dir)
    result.model_ref = model_ref
    if name and version or (cfg.track.enabled and loaded.info.get("run_id")):
        from medgan.tracking.evaluation import log_evaluation
        from medgan.tracking.registry import set_alias

        result.run_id = log_evaluation(cfg.track.tracking_uri, loaded.info, result.metrics, result.report_dir, dataset)
        if promote and result.gates_passed:
            set_alias(cfg.track.tracking_uri, name, version, "champion")
            result.promoted = True
        elif promote:
            failed = ", ".join(
                g.name + (f" (not measurable: {g.reason})" if g.reason else "") for g in result.gates if not g.passed
            )
            result.notes.append(f"not promoted: gate(s) failed: {failed}; 'champion' is unchanged")
    else:
        result.notes.append("a checkpoint without a registered version or tracked run: nothing logged to MLflow")
    return result
