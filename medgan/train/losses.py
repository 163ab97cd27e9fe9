"""GAN losses on logits: non-saturating logistic (Goodfellow 2014) and hinge (Lim & Ye 2017), one-sided label smoothing,
and the lazy R1 penalty (Mescheder 2018; lazy form from Karras 2020)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn import functional as F

LOSSES = ("nsgan", "hinge")


def check_loss(name: str) -> str:
    if name not in LOSSES:
        raise ValueError(f"train.loss={name!r} is not supported; use one of {LOSSES}")
    return name


def discriminator_loss(kind: str, real: torch.Tensor, fake: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """D's loss from its logits on real and fake images (mean over the batch), computed in fp32."""
    real, fake = real.float(), fake.float()
    if kind == "hinge":
        # Smoothing moves the real margin from 1 to 1 - s, the hinge analogue of a softer target.
        return F.relu(1.0 - label_smoothing - real).mean() + F.relu(1.0 + fake).mean()
    # One-sided smoothing (Salimans 2016): real targets 1 - s, fake targets stay 0.
    target = torch.full_like(real, 1.0 - label_smoothing)
    return F.binary_cross_entropy_with_logits(real, target) + F.softplus(fake).mean()


def generator_loss(kind: str, fake: torch.Tensor) -> torch.Tensor:
    """G's loss from D's logits on fakes: non-saturating -log sigmoid(D(G(z))), or -D(G(z)) for hinge."""
    fake = fake.float()
    if kind == "hinge":
        return -fake.mean()
    return F.softplus(-fake).mean()


def class_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of D's class head (auxiliary classifier, Odena 2017) against the labels, in fp32."""
    return F.cross_entropy(logits.float(), labels)


def r1_penalty(run_d: Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """||grad_x D(x)||^2 per real image, in fp32 (bf16 gradients of gradients are too coarse for this penalty).

    Returns:
        (penalty [B], logits [B]).
    """
    x = real.detach().float().requires_grad_(True)
    logits = run_d(x).float()
    (grad,) = torch.autograd.grad(logits.sum(), x, create_graph=True)
    return grad.square().sum(dim=(1, 2, 3)), logits
