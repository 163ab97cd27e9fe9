"""Channel-reduced feature-map discriminator: image -> 64x64 stem -> 1x1 reduction -> strided blocks -> projection.

The 1x1 reduction is the fix for a known failure: a conditional D fed 64-channel 64x64 feature maps with small batches
overfits within a few epochs (D loss ~1e-4, 100% accuracy, G loss past 5-10). Reducing 64 -> 32 channels before the
downsampling stack (plus a batch of 32 instead of 4) keeps it learning; ``reduce_channels=None`` rebuilds the unreduced
design for ablations. Conditioning is the projection of Miyato & Koyama 2018: logit = psi(h) + <embed(y), h>.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _sn

from medgan.config import ModelConfig

RESOLUTION = 128


class Discriminator(nn.Module):
    def __init__(
        self,
        num_classes: int,
        width: int = 64,
        max_channels: int = 512,
        reduce_channels: int | None = 32,
        spectral_norm: bool = True,
        class_head: bool = False,
    ):
        super().__init__()
        if reduce_channels is not None and reduce_channels < 1:
            raise ValueError(f"reduce_channels must be a positive channel count or None, got {reduce_channels}")
        sn = _sn if spectral_norm else (lambda m: m)
        self.num_classes, self.width, self.reduce_channels = num_classes, width, reduce_channels
        # Channels per resolution: `width` at 64x64 doubling per halving, capped (DCGAN-128 widths at width=64).
        ch = {r: min(width * (64 // r), max_channels) for r in (64, 32, 16, 8, 4)}
        # Stem: 128x128x1 -> 64x64x`width`, the feature map the issue is about.
        self.stem = nn.Sequential(sn(nn.Conv2d(1, width, 4, stride=2, padding=1)), nn.LeakyReLU(0.2))
        # 1x1 channel reduction (the fix); Identity reproduces the unreduced design.
        c64 = width if reduce_channels is None else reduce_channels
        self.reduce = (
            nn.Identity()
            if reduce_channels is None
            else nn.Sequential(sn(nn.Conv2d(width, reduce_channels, 1)), nn.LeakyReLU(0.2))
        )
        cins = {64: c64, 32: ch[32], 16: ch[16], 8: ch[8]}
        couts = {64: ch[32], 32: ch[16], 16: ch[8], 8: ch[4]}
        self.blocks = nn.Sequential(
            *[
                nn.Sequential(sn(nn.Conv2d(cins[r], couts[r], 4, stride=2, padding=1)), nn.LeakyReLU(0.2))
                for r in (64, 32, 16, 8)  # 64 -> 32 -> 16 -> 8 -> 4
            ]
        )
        self.out_channels = ch[4]
        self.fc = sn(nn.Linear(ch[4], 1))
        self.embed = sn(nn.Embedding(num_classes, ch[4]))
        # Auxiliary classifier on the pooled features (model.class_loss > 0): class logits beside the real/fake logit.
        self.classify = sn(nn.Linear(ch[4], num_classes)) if class_head else None

    def stem_features(self, x: torch.Tensor) -> torch.Tensor:
        """The stem's feature map, [B, width, 64, 64]."""
        shape = (1, RESOLUTION, RESOLUTION)
        assert x.ndim == 4 and x.shape[1:] == shape, f"D expects [B, 1, 128, 128], got {tuple(x.shape)}"
        return self.stem(x)  # (B, w, 64, 64)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The reduced 64x64 map fed to the downsampling blocks, [B, reduce_channels or width, 64, 64]."""
        return self.reduce(self.stem_features(x))

    def forward(
        self, x: torch.Tensor, labels: torch.Tensor, with_class: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Real/fake logits [B]; with ``with_class`` also the class head's logits [B, num_classes]."""
        assert labels.shape == (x.shape[0],), f"labels must be [B]={x.shape[0]}, got {tuple(labels.shape)}"
        h = self.blocks(self.features(x))  # (B, C4, 4, 4)
        h = h.sum(dim=(2, 3))  # (B, C4): sum pooling as in SNGAN/BigGAN
        # Projection conditioning (Miyato & Koyama 2018, eq. 3): unconditional term + class-embedding inner product.
        logits = self.fc(h).squeeze(1) + (self.embed(labels) * h).sum(dim=1)
        if with_class:
            assert self.classify is not None, "with_class needs a class head (model.class_loss > 0)"
            return logits, self.classify(h)
        return logits  # (B,) logits, never probabilities

    @classmethod
    def from_config(cls, cfg: ModelConfig, num_classes: int) -> Discriminator:
        head = cfg.class_loss > 0
        return cls(num_classes, cfg.width, cfg.d_max_channels, cfg.d_reduce_channels, cfg.spectral_norm, head)
