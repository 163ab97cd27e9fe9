"""Differentiable augmentation for small datasets: DiffAugment (Zhao 2020) ops gated by an ADA-style p (Karras 2020).

Every op is differentiable, so G gets gradients through augmented fakes, and D only ever sees augmented images (reals
and fakes alike), which keeps it from memorising a small training set. Ops suit grayscale slices: brightness, contrast,
translation by up to 1/8 of the side and a cutout of half the side; empty regions are filled with black (-1).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

MODES = ("diffaug", "ada", "none")


class Augment:
    """Augmentation state: the probability p (a device tensor, so adapting it never syncs the host) and its controller.

    `mode`: diffaug = every op on every image (p = 1); ada = each op applied per image with probability p, where p
    follows r_t = E[sign(D(real))] toward `target`; none = identity.
    """

    def __init__(self, mode: str, target: float, speed_kimg: float, interval: int, device: torch.device):
        if mode not in MODES:
            raise ValueError(f"train.augment={mode!r} is not supported; use one of {MODES}")
        self.mode, self.target, self.speed_kimg, self.interval = mode, target, speed_kimg, max(1, interval)
        self.p = torch.tensor(1.0 if mode == "diffaug" else 0.0, device=device)
        self.acc = torch.zeros((), device=device)  # sum of E[sign(D(real))] since the last adjustment
        self.n = 0  # D steps accumulated in `acc`

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if self.mode == "none":
            return x
        return augment(x, self.p, gen)

    def observe(self, real_logits: torch.Tensor, batch_size: int, reduce=lambda t: t) -> None:
        """Accumulate r_t and, every `interval` D steps, move p toward the target (ADA, Karras 2020 sec. 3)."""
        if self.mode != "ada":
            return
        self.acc = self.acc + torch.sign(real_logits.detach().float()).mean()
        self.n += 1
        if self.n < self.interval:
            return
        r_t = reduce(self.acc / self.n)  # averaged over DDP ranks so every rank keeps the same p
        step = batch_size * self.n / (self.speed_kimg * 1000.0)
        self.p = (self.p + torch.sign(r_t - self.target) * step).clamp(0.0, 1.0)
        self.acc, self.n = torch.zeros_like(self.acc), 0

    def state_dict(self) -> dict[str, float]:
        return {"p": float(self.p), "acc": float(self.acc), "n": self.n}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.p = torch.tensor(float(state["p"]), device=self.p.device)
        self.acc = torch.tensor(float(state["acc"]), device=self.p.device)
        self.n = int(state["n"])


def augment(x: torch.Tensor, p: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Apply brightness, contrast, translation and cutout to [B, 1, H, W] images in [-1, 1], each with probability p."""
    b, _, h, w = x.shape
    dev, dt = x.device, x.dtype
    r = torch.rand(b, 10, device=dev, generator=gen)  # all per-image randomness, drawn once
    gate = (r[:, :4] < p).to(dt)  # (B, 4): brightness, contrast, translation, cutout
    # Brightness: shift by U(-0.25, 0.25) in [-1, 1] units.
    x = x + ((r[:, 4] - 0.5) * 0.5 * gate[:, 0]).view(b, 1, 1, 1).to(dt)
    # Contrast: scale about the image mean by U(0.5, 1.5).
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    scale = 1.0 + (r[:, 5] - 0.5) * gate[:, 1]
    x = (x - mean) * scale.view(b, 1, 1, 1).to(dt) + mean
    # Translation by whole pixels (up to 1/8 of the side), black fill: gather from a padded copy.
    pad = max(1, h // 8)
    sy = (((r[:, 6] * (2 * pad + 1)).floor() - pad) * gate[:, 2]).long()
    sx = (((r[:, 7] * (2 * pad + 1)).floor() - pad) * gate[:, 2]).long()
    xp = F.pad(x + 1.0, (pad, pad, pad, pad))  # zero padding of x + 1 = black in [-1, 1]
    iy = (torch.arange(h, device=dev).view(1, h, 1) + pad - sy.view(b, 1, 1)).expand(b, h, w)
    ix = (torch.arange(w, device=dev).view(1, 1, w) + pad - sx.view(b, 1, 1)).expand(b, h, w)
    flat = (iy * (w + 2 * pad) + ix).view(b, 1, h * w)
    x = xp.flatten(2).gather(2, flat).view(b, 1, h, w) - 1.0
    # Cutout: one black square of half the side at a random centre.
    cy = (r[:, 8] * h).long().view(b, 1, 1)
    cx = (r[:, 9] * w).long().view(b, 1, 1)
    yy = torch.arange(h, device=dev).view(1, h, 1)
    xx = torch.arange(w, device=dev).view(1, 1, w)
    hole = ((yy - cy).abs() < h // 4) & ((xx - cx).abs() < w // 4) & (gate[:, 3] > 0).view(b, 1, 1)
    keep = (~hole).to(dt).unsqueeze(1)
    return (x + 1.0) * keep - 1.0
