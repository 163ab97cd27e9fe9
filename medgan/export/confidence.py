"""The class-confidence filter of ``medgan export --min-class-confidence P``: only samples that look like their class.

The judge is `medgan evaluate`'s domain network: the CNN trained on the real *train* split only (never val, test or
synthetic images), with the evaluation's recipe (``eval.feature_epochs``, ``eval.seed``) and its cache, so the filter
and the class-fidelity figure see with the same eyes. For each class the filter draws images in the order of the seed
rule (`medgan.sampling`: index 0, 1, 2, ... of the class, in the same batches an unfiltered export uses) and keeps
those whose probability for the asked class is at least P, until the class has its count or its draws run out
(``export.max_draws_per_class``). A kept image is bit for bit the image an unfiltered export writes for its seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from medgan.config import Config
    from medgan.evaluate.features import DomainNet
    from medgan.models.generator import Generator, LoadedGenerator


@dataclass
class ConfidenceFilter:
    """Keep a sample when ``domain(image)[asked class] >= min_confidence``.

    Attributes:
        min_confidence: P in (0, 1].
        domain: the domain network (trained on the real train split).
        info: its provenance (recipe, dataset hash, validation accuracy, cache path).
        max_draws_per_class: at most this many images are drawn per class.
    """

    min_confidence: float
    domain: DomainNet
    info: dict[str, Any]
    max_draws_per_class: int

    def record(self) -> dict[str, Any]:
        """What ``dataset.json`` stores about the filter (per-class figures are added by `draw_confident`)."""
        keep = ("arch", "recipe", "dataset_hash", "n_train", "val_accuracy", "steps")
        return {
            "min_class_confidence": self.min_confidence,
            "rule": "keep a sample when the domain classifier's probability of the asked class >= min_class_confidence",
            "classifier": {k: self.info.get(k) for k in keep if k in self.info},
            "max_draws_per_class": self.max_draws_per_class,
        }


def domain_filter(cfg: Config, loaded: LoadedGenerator, data: Path | None) -> ConfidenceFilter:
    """The filter ``cfg.export.min_class_confidence`` asks for, judged by the domain network of real dataset `data`.

    Raises:
        ValueError: P outside (0, 1], no `data`, a synthetic `data`, or classes that differ from the generator's.
    """
    from medgan.dataset import SliceDataset
    from medgan.evaluate.features import Recipe, real_classifier

    e, ev = cfg.export, cfg.eval
    p = e.min_class_confidence
    if not 0 < p <= 1:
        raise ValueError(f"--min-class-confidence is {p}; use a probability in (0, 1], e.g. 0.9 (0 = no filter)")
    if data is None:
        raise ValueError(
            "--min-class-confidence needs --data DATASET: the real slice dataset the generator learned from, whose "
            "train split trains the domain classifier that judges each sample"
        )
    dataset = SliceDataset.open(Path(data))
    if dataset.synthetic:
        raise ValueError(f"--data {data} is a synthetic dataset; the filter's classifier learns from real images only")
    if list(dataset.classes) != list(loaded.classes):
        raise ValueError(
            f"--data {data} has classes {dataset.classes} but the generator knows {loaded.classes}; use the dataset "
            "it was trained on"
        )
    max_draws = e.max_draws_per_class or 20 * e.n_per_class
    if max_draws < e.n_per_class:
        raise ValueError(
            f"export.max_draws_per_class is {max_draws}, fewer than --n-per-class {e.n_per_class}; raise it or use 0 "
            "(20 x n_per_class)"
        )
    recipe = Recipe(epochs=ev.feature_epochs, seed=ev.seed, min_steps=ev.classifier_min_steps)
    net, info = real_classifier(dataset, recipe, Path(ev.cache_dir) if ev.cache_dir else None)
    return ConfidenceFilter(p, net, dict(info), max_draws)


def draw_confident(
    G: Generator,
    classes: list[str],
    labels: list[int],
    n_per_class: int,
    base_seed: int,
    flt: ConfidenceFilter,
    device: str = "cpu",
    batch_size: int = 256,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """Draw each class's images in seed-rule order and keep the first `n_per_class` the filter accepts.

    Returns:
        (images float32 [len(labels) * n_per_class, 1, 128, 128] class-major, their seeds int64, their confidences
        float64, the filter's record with ``per_class``: kept, draws, acceptance_rate).

    Raises:
        ValueError: a class that does not reach `n_per_class` within ``max_draws_per_class`` draws (the message gives
            the acceptance rate and the ways out).
    """
    from medgan.evaluate.features import predict
    from medgan.sampling import sample_class

    images, seeds, confidences, per_class = [], [], [], {}
    for c in labels:
        kept_x, kept_s, kept_p, drawn, accepted = [], [], [], 0, 0
        while sum(len(s) for s in kept_s) < n_per_class and drawn < flt.max_draws_per_class:
            stop = min(drawn + batch_size - drawn % batch_size, flt.max_draws_per_class)
            x, s = sample_class(G, c, drawn, stop, base_seed, device, batch_size)
            p = predict(flt.domain, x)[0][:, c]
            ok = np.flatnonzero(p >= flt.min_confidence)
            accepted += len(ok)
            need = n_per_class - sum(len(k) for k in kept_s)
            kept_x.append(x[ok[:need]])
            kept_s.append(s[ok[:need]])
            kept_p.append(p[ok[:need]])
            drawn = stop
        n_kept = sum(len(s) for s in kept_s)
        rate = accepted / drawn if drawn else 0.0
        if n_kept < n_per_class:
            raise ValueError(
                f"--min-class-confidence {flt.min_confidence}: class {classes[c]!r} kept {n_kept} of {drawn} draws "
                f"(acceptance {rate:.1%}), {n_per_class} needed within export.max_draws_per_class "
                f"({flt.max_draws_per_class}); lower P, export fewer images, or raise "
                "--set export.max_draws_per_class=N"
            )
        images += kept_x
        seeds += kept_s
        confidences += kept_p
        per_class[classes[c]] = {"kept": n_kept, "draws": drawn, "accepted": accepted, "acceptance_rate": rate}
    record = {**flt.record(), "per_class": per_class}
    return np.concatenate(images), np.concatenate(seeds), np.concatenate(confidences).astype(np.float64), record
