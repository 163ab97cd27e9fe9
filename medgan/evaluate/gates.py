"""Evaluation results and the promotion gates: what `medgan evaluate` returns and what ``--promote`` checks."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from medgan.config import EvalConfig

NOT_MEASURABLE = "not measurable"


def describe_value(key: str, metrics: dict[str, float], not_measurable: dict[str, str]) -> str:
    """A figure as text: the number (4 significant digits), or ``not measurable: <reason>``; never "nan"."""
    if key in not_measurable:
        return f"{NOT_MEASURABLE}: {not_measurable[key]}"
    value = metrics.get(key)
    if value is None or not math.isfinite(float(value)):
        return f"{NOT_MEASURABLE}: not computed"
    return f"{float(value):.4g}"


@dataclass
class GateResult:
    """One promotion gate: ``value op threshold`` must hold; a figure that was not measured fails with its reason."""

    name: str
    metric: str
    value: float | None
    op: str
    threshold: float
    passed: bool
    reason: str = ""  # why the figure is not measurable (empty when it was measured)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        verdict = "pass" if self.passed else "FAIL"
        shown = f"{self.value:.4g}" if self.value is not None else f"{NOT_MEASURABLE}: {self.reason}"
        return f"{verdict}: {self.name} = {shown} (needs {self.op} {self.threshold:g}; metric {self.metric})"


def gate_rules(eval_cfg: EvalConfig) -> list[tuple[str, str, str, float]]:
    """The gates as (name, metric, op, threshold), in the order they are reported."""
    return [
        ("TSTR/TRTR ratio", "tstr_trtr_ratio", ">=", eval_cfg.gate_min_tstr_ratio),
        ("near-copy fraction", "near_copy_fraction", "<=", eval_cfg.gate_max_near_copy_fraction),
        ("class fidelity", "class_fidelity", ">=", eval_cfg.gate_min_class_fidelity),
        ("recall", "recall", ">=", eval_cfg.gate_min_recall),
    ]


def check_gates(
    metrics: dict[str, float], eval_cfg: EvalConfig, not_measurable: dict[str, str] | None = None
) -> list[GateResult]:
    """The promotion gates over evaluation metrics: a pure function of the metrics and ``cfg.eval``.

    Gates: TSTR/TRTR balanced-accuracy ratio (mean over classifier seeds) >= ``gate_min_tstr_ratio``; pixel near-copy
    fraction <= ``gate_max_near_copy_fraction``; class fidelity >= ``gate_min_class_fidelity``; recall >=
    ``gate_min_recall``. A figure listed in `not_measurable` fails with that reason; a missing or NaN one fails too.

    Example:
        >>> metrics = {"tstr_trtr_ratio": 0.9, "near_copy_fraction": 0.0, "class_fidelity": 0.8, "recall": 0.5}
        >>> gates = check_gates(metrics, EvalConfig())
        >>> all(g.passed for g in gates)
        True
    """
    not_measurable = not_measurable or {}
    out = []
    for name, key, op, threshold in gate_rules(eval_cfg):
        raw = metrics.get(key)
        value = float(raw) if raw is not None and math.isfinite(float(raw)) else None
        reason = not_measurable.get(key, "" if value is not None else "not computed")
        ok = reason == "" and value is not None and (value >= threshold if op == ">=" else value <= threshold)
        out.append(GateResult(name, key, value if not reason else None, op, float(threshold), bool(ok), reason))
    return out


@dataclass
class EvalResult:
    """What an evaluation produced.

    Attributes:
        metrics: flat measured metrics, numbers only (also in ``metrics.json`` and the MLflow run), counts as ``n_*``.
        gates: the promotion gates, evaluated whether or not promotion was asked for.
        report_dir: the folder with metrics.json, report.md and the figures.
        not_measurable: figures that could not be measured, each with its reason (absent from `metrics`).
        promoted: alias ``champion`` now points at the evaluated version.
        model_ref: what was evaluated.
        info: provenance of the generator (name, version, run_id, checkpoint, dataset_hash; those known).
        run_id: the MLflow evaluation run, when one was recorded.
        notes: what the reader should know (skipped registry steps, a dataset-hash mismatch, ...).
    """

    metrics: dict[str, float]
    gates: list[GateResult]
    report_dir: Path
    not_measurable: dict[str, str] = field(default_factory=dict)
    promoted: bool = False
    model_ref: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    run_id: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def gates_passed(self) -> bool:
        return all(g.passed for g in self.gates)

    def value(self, key: str) -> str:
        """One figure as text: its number, or ``not measurable: <reason>``."""
        return describe_value(key, self.metrics, self.not_measurable)

    def _utility_lines(self, utility: Any) -> list[str]:
        seeds = int(self.metrics.get("classifier_seeds", 1))
        reasons = {self.not_measurable.get(f"{who}_balanced_accuracy") for who in ("tstr", "trtr", "mixed")}
        if len(reasons) == 1 and None not in reasons:  # one reason for every classifier: say it once
            return [f"  classifiers on the real test split: {NOT_MEASURABLE}: {reasons.pop()}"]
        f = self.value
        return [
            f"  classifiers on the real test split, mean ± std over {seeds} seed(s):",
            f"    TSTR (synthetic)        {utility('tstr')}",
            f"    TRTR (real)             {utility('trtr')}",
            f"    real + synthetic        {utility('mixed')}",
            f"    TSTR/TRTR ratio {f('tstr_trtr_ratio')} (macro AUC ratio {f('tstr_trtr_auc_ratio')}); "
            f"real+synthetic minus real: balanced acc {f('mixed_trtr_delta')}, macro AUC {f('mixed_trtr_auc_delta')}",
        ]

    def summary(self) -> str:
        m, f = self.metrics, self.value

        def utility(who: str) -> str:
            out = []
            for what in ("balanced_accuracy", "macro_auc"):
                key = f"{who}_{what}"
                std = f" ± {m[key + '_std']:.2g}" if key in m and f"{key}_std" in m else ""
                out.append(f"{f(key)}{std}")
            return f"balanced acc {out[0]}, macro AUC {out[1]}"

        lines = [
            f"Evaluated {self.model_ref or 'synthetic images'}: {int(m['n_synthetic'])} synthetic vs "
            f"{int(m['n_train'])} real train / {int(m['n_val'])} val / {int(m['n_test'])} test images",
            f"  domain classifier: val accuracy {f('domain_val_accuracy')}, test accuracy {f('domain_test_accuracy')}",
            f"  FD {f('fd')} (real floor {f('fd_real_floor')}, n={int(m['n_eval'])}); KID x1000 {f('kid_x1000')} "
            f"(floor {f('kid_real_floor_x1000')})",
            f"  precision {f('precision')} recall {f('recall')} (floor {f('precision_real_floor')} / "
            f"{f('recall_real_floor')}); density {f('density')} coverage {f('coverage')}",
            f"  class fidelity {f('class_fidelity')}; within-class MS-SSIM {f('ms_ssim_synthetic')} "
            f"(real {f('ms_ssim_real')})",
            *self._utility_lines(utility),
            f"  near copies {f('near_copy_fraction')} (pixel; real unseen {f('near_copy_fraction_real')}), "
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
