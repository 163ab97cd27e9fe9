"""What an ingest reports: the `IngestReport` with its printed summary, and one report line for a row that was read
as several sub-folders."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class IngestReport:
    """What an ingest did: counts, skipped sources with reasons, where the dataset is."""

    dataset_path: Path | None
    n_slices: int
    n_ok: int
    n_skipped: int
    report: list[dict[str, Any]]
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    classes: list[str] = field(default_factory=list)
    content_hash: str = ""
    seconds: float = 0.0
    n_reused: int = 0
    n_items: int = 0  # work items (a volume source or a batch of 2-D images)

    def summary(self) -> str:
        """A human-readable summary: counts per split and class, skipped sources with reasons, the output path."""
        lines = [
            f"ingest: {self.n_ok} source{'s' * (self.n_ok != 1)} ok, {self.n_skipped} skipped, {self.n_slices} slices "
            f"in {self.seconds:.1f} s ({self.n_slices / max(self.seconds, 1e-9):.0f} slices/s)"
            + (f"; {self.n_reused} work items reused from an earlier run" if self.n_reused else "")
        ]
        if self.classes:
            width = max(8, *(len(c) for c in self.classes))
            lines.append(f"  {'split':<6} " + " ".join(f"{c:>{width}}" for c in self.classes) + f" {'total':>8}")
            for split, per in self.counts.items():
                vals = [per.get(c, 0) for c in self.classes]
                lines.append(f"  {split:<6} " + " ".join(f"{v:>{width}}" for v in vals) + f" {sum(vals):>8}")
        skipped = [r for r in self.report if r["status"] == "skipped"]
        if skipped:
            lines.append("skipped:")
            for r in skipped[:50]:
                lines.append(f"  row {r['manifest_row']} {r['source']}: {r['reason']}")
            if len(skipped) > 50:
                lines.append(f"  ... and {len(skipped) - 50} more (see report.csv)")
        if self.dataset_path is not None:
            lines.append(f"dataset: {self.dataset_path} (content hash {self.content_hash[:16]})")
        else:
            lines.append("dataset: not written (no slice could be ingested)")
        return "\n".join(lines)


def merge_parts(parts: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    """One report line for a row read per sub-folder (`expand_folders`): ok when any sub-folder gave slices, and each
    sub-folder reason once, with the numbers of the sub-folders that gave it."""
    if len(parts) == 1 and parts[0][0] == 0:
        return parts[0][1]
    by_reason: dict[str, list[int]] = defaultdict(list)
    for k, r in parts:
        if r["reason"]:
            by_reason[r["reason"]].append(k)
    n_ok = sum(r["status"] == "ok" for _, r in parts)
    notes = [f"sub-folder{'s' * (len(ks) > 1)} {_ranges(ks)}: {reason}" for reason, ks in by_reason.items()]
    reason = "; ".join([f"read as {len(parts)} sub-folders, {n_ok} with slices", *notes])
    n_slices = sum(r["n_slices"] for _, r in parts)
    return {**parts[0][1], "status": "ok" if n_ok else "skipped", "reason": reason, "n_slices": n_slices}


def _ranges(numbers: list[int]) -> str:
    """1, 2, 3, 5 -> "1-3, 5"."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)
