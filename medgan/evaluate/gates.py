"""Evaluation results and the promotion gates: what `medgan evaluate` returns and what ``--promote`` checks."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from medgan.config import EvalConfig


@dataclass
class GateResult:
    """One promotion gate: ``value op threshold`` must hold (a NaN value fails)."""

    name: str
    metric: str
    value: float
    op: str
    threshold: float
    passed: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        verdict = "pass" if self.passed else "FAIL"
        return f"{verdict}: {self.name} = {self.value:.4g} (needs {self.op} {self.threshold:g}; metric {self.metric})"


def check_gates(metrics: dict[str, float], eval_cfg: EvalConfig) -> list[GateResult]:
    """The promotion gates over evaluation metrics: a pure function of the metrics and ``cfg.eval``.

    Gates: TSTR/TRTR balanced-accuracy ratio >= ``gate_min_tstr_ratio``; pixel near-copy fraction <=
    ``gate_max_near_copy_fraction``; class fidelity >= ``gate_min_class_fidelity``. A missing or NaN metric fails.

    Example:
        >>> metrics = {"tstr_trtr_ratio": 0.9, "near_copy_fraction": 0.0, "class_fidelity": 0.8}
        >>> gates = check_gates(metrics, EvalConfig())
        >>> all(g.passed for g in gates)
        True
    """
    rules = [
        ("TSTR/TRTR ratio", "tstr_trtr_ratio", ">=", eval_cfg.gate_min_tstr_ratio),
        ("near-copy fraction", "near_copy_fraction", "<=", eval_cfg.gate_max_near_copy_fraction),
        ("class fidelity", "class_fidelity", ">=", eval_cfg.gate_min_class_fidelity),
    ]
    out = []
    for name, key, op, threshold in rules:
        value = float(metrics.get(key, float("nan")))
        ok = not math.isnan(value) and (value >= threshold if op == ">=" else value <= threshold)
        out.append(GateResult(name, key, value, op, float(threshold), bool(ok)))
    return out


@dataclass
class EvalResult:
    """What an evaluation produced.

    Attributes:
        metrics: flat metrics (also in ``metrics.json`` and the MLflow run), counts included as ``n_*``.
        gates: the promotion gates, evaluated whether or not promotion was asked for.
        report_dir: the folder with metrics.json, report.md and the figures.
        promoted: alias ``champion`` now points at the evaluated version.
        model_ref: what was evaluated.
        info: provenance of the generator (name, version, run_id, checkpoint, dataset_hash; those known).
        run_id: the MLflow evaluation run, when one was recorded.
        notes: what the reader should know (skipped registry steps, a dataset-hash mismatch, ...).
    """

    metrics: dict[str, float]
    gates: list[GateResult]
    report_dir: Path
    promoted: bool = False
    model_ref: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    run_id: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def gates_passed(self) -> bool:
        return all(g.passed for g in self.gates)

    def summary(self) -> str:
        m = self.metrics
        f = lambda k: f"{m.get(k, float('nan')):.4g}"  # noqa: E731
        lines = [
            f"Evaluated {self.model_ref or 'synthetic images'}: {int(m['n_synthetic'])} synthetic vs "
            f"{int(m['n_train'])} real train / {int(m['n_test'])} test images",
            f"  domain classifier: val accuracy {f('domain_val_accuracy')}, test accuracy {f('domain_test_accuracy')}",
            f"  FD {f('fd')} (real floor {f('fd_real_floor')}, n={int(m['n_eval'])}); KID x1000 {f('kid_x1000')} "
            f"(floor {f('kid_real_floor_x1000')})",
            f"  precision {f('precision')} recall {f('recall')} (floor {f('precision_real_floor')} / "
            f"{f('recall_real_floor')}); density {f('density')} coverage {f('coverage')}",
            f"  class fidelity {f('class_fidelity')}; within-class MS-SSIM {f('ms_ssim_synthetic')} "
            f"(real {f('ms_ssim_real')})",
            f"  TSTR balanced acc {f('tstr_balanced_accuracy')} / TRTR {f('trtr_balanced_accuracy')} = ratio "
            f"{f('tstr_trtr_ratio')}; macro AUC {f('tstr_macro_auc')} / {f('trtr_macro_auc')}",
            f"  near copies {f('near_copy_fraction')} (pixel; real val {f('near_copy_fraction_real')}), "
            f"{f('near_copy_fraction_features')} (features); "
            f"NN distance ratio {f('nn_distance_ratio')}",
            "Gates:",
            *[f"  {g.describe()}" for g in self.gates],
        ]
        lines += [f"Note: {n}" for n in self.notes]
        if self.promoted:
            lines.append(f"Promoted: alias 'champion' -> {self.info.get('name')} version {self.info.get('version')}")
        lines.append(f"Report: {self.report_dir}/report.md" + (f" (MLflow run {self.run_id})" if self.run_id else ""))
        return "\n".join(lines)
