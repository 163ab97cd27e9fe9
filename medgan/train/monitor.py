"""Health watch: discriminator overpowering, mode collapse and NaN/inf, read only at log intervals (no per-step sync).

Overpowering is the failure this product is built around: D's loss falls to ~1e-4, it scores real ~1 and fake ~0 with
100% accuracy, and G stops learning. Mode collapse shows as the within-class diversity of a fixed-noise batch falling
far below that of real images of the class.
"""

from __future__ import annotations

import math

import numpy as np
import torch

KEYS = ("loss/d", "loss/g", "d/prob_real", "d/prob_fake", "d/acc_real", "d/acc_fake", "d/r_t")


class NonFiniteError(RuntimeError):
    """Training produced NaN/inf; the message names the metric, the kimg and the last good checkpoint."""


class Monitor:
    """Accumulates per-step statistics on the device and turns them into metrics and alarms at each log interval.

    Args:
        device: where the running sums live.
        patience: consecutive log intervals a symptom must persist before the alarm fires.
        d_loss_floor: D loss below this counts as overpowering.
        d_acc_ceiling: D accuracy on both real and fake at or above this counts as overpowering.
        collapse_ratio: within-class diversity of samples below this fraction of the real one counts as collapse.
    """

    def __init__(
        self,
        device: torch.device,
        patience: int = 3,
        d_loss_floor: float = 1e-3,
        d_acc_ceiling: float = 0.99,
        collapse_ratio: float = 0.1,
    ):
        self.patience, self.d_loss_floor, self.d_acc_ceiling, self.collapse_ratio = (
            patience,
            d_loss_floor,
            d_acc_ceiling,
            collapse_ratio,
        )
        self.sums = torch.zeros(len(KEYS), device=device, dtype=torch.float64)
        self.count = torch.zeros((), device=device, dtype=torch.float64)
        self.streaks = {"d_overpowering": 0, "mode_collapse": 0}
        self.alarms: list[str] = []
        self.fired: set[str] = set()
        self.best_ratio = 0.0  # highest diversity ratio seen so far

    @torch.no_grad()
    def record_d(self, loss_d: torch.Tensor, real: torch.Tensor, fake: torch.Tensor) -> None:
        # One fused update of device sums from D's logits; nothing here waits for the device.
        real, fake = real.detach().float(), fake.detach().float()
        stats = torch.stack(
            [
                loss_d.detach().float(),
                torch.zeros((), device=real.device),
                torch.sigmoid(real).mean(),
                torch.sigmoid(fake).mean(),
                (real > 0).float().mean(),
                (fake < 0).float().mean(),
                torch.sign(real).mean(),
            ]
        )
        self.sums += stats.double()
        self.count += 1

    @torch.no_grad()
    def record_g(self, loss_g: torch.Tensor, d_steps: int) -> None:
        # Weighted so that loss/g averages over G steps while the other sums average over D steps.
        self.sums[1] += loss_g.detach().double() * d_steps

    def read(self) -> dict[str, float]:
        """Averages since the last read (one host sync), then reset."""
        values = (self.sums / self.count.clamp(min=1)).cpu().tolist()
        self.sums.zero_()
        self.count.zero_()
        return dict(zip(KEYS, values, strict=True))

    @staticmethod
    def check_finite(metrics: dict[str, float], kimg: float, last_checkpoint: str | None) -> None:
        """Raise NonFiniteError when any metric is NaN/inf."""
        bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
        if bad:
            keep = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written"
            raise NonFiniteError(
                f"training diverged at {kimg:.3f} kimg: {', '.join(bad)} became NaN/inf; stopped, {keep}. "
                "Resume from it with a lower train.lr_d/train.lr_g, train.precision=fp32 or a larger train.r1_gamma."
            )

    def _streak(self, name: str, symptom: bool, message: str) -> float:
        self.streaks[name] = self.streaks[name] + 1 if symptom else 0
        if self.streaks[name] >= self.patience and name not in self.fired:
            self.fired.add(name)
            self.alarms.append(message)
        return 1.0 if self.streaks[name] >= self.patience else 0.0

    def check_overpowering(self, metrics: dict[str, float], kimg: float) -> dict[str, float]:
        """Update the overpowering streak; returns {"alarm/d_overpowering": 0|1}."""
        acc = min(metrics["d/acc_real"], metrics["d/acc_fake"])
        symptom = metrics["loss/d"] < self.d_loss_floor or acc >= self.d_acc_ceiling
        msg = (
            f"discriminator overpowering at {kimg:.3f} kimg: loss/d={metrics['loss/d']:.2e}, "
            f"acc real/fake={metrics['d/acc_real']:.2f}/{metrics['d/acc_fake']:.2f} for {self.patience} log intervals; "
            "G gets no useful gradient. Try model.d_reduce_channels=32, a larger train.batch_size, train.augment=ada "
            "or a lower train.lr_d."
        )
        return {"alarm/d_overpowering": self._streak("d_overpowering", symptom, msg)}

    def check_collapse(
        self, samples: np.ndarray, labels: np.ndarray, real_diversity: np.ndarray, kimg: float
    ) -> dict[str, float]:
        """Within-class diversity of fixed-noise samples relative to real ones; returns the ratio and alarm flag."""
        ratios = []
        for c, ref in enumerate(real_diversity):
            fake = samples[labels == c]
            if len(fake) >= 2 and ref > 0:
                ratios.append(diversity(fake) / ref)
        ratio = float(min(ratios)) if ratios else 1.0
        msg = (
            f"mode collapse at {kimg:.3f} kimg: within-class diversity of fixed-noise samples is {ratio:.3f} x that of "
            "real images; try train.augment=ada, a lower train.lr_g or more train.d_steps."
        )
        # Collapse is a fall: a freshly initialised G also has low diversity, so only count it once diversity existed.
        self.best_ratio = max(self.best_ratio, ratio)
        falling = ratio < self.collapse_ratio and self.best_ratio >= 2 * self.collapse_ratio
        flag = self._streak("mode_collapse", falling, msg)
        return {"health/diversity_ratio": ratio, "alarm/mode_collapse": flag}

    def state_dict(self) -> dict:
        return {
            "streaks": dict(self.streaks),
            "alarms": list(self.alarms),
            "fired": sorted(self.fired),
            "best_ratio": self.best_ratio,
        }

    def load_state_dict(self, state: dict) -> None:
        self.streaks.update(state["streaks"])
        self.alarms, self.fired = list(state["alarms"]), set(state["fired"])
        self.best_ratio = float(state["best_ratio"])


def diversity(images: np.ndarray) -> float:
    """Mean pairwise RMS distance between images [n, ...] (0 for identical images)."""
    x = np.asarray(images, dtype=np.float64).reshape(len(images), -1)
    sq = (x * x).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0.0) / x.shape[1]
    n = len(x)
    return float(np.sqrt(d2)[~np.eye(n, dtype=bool)].mean()) if n > 1 else 0.0
