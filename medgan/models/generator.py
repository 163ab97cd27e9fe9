"""Class-conditional generator: z + class -> 4x4 -> ... -> 64x64x64 penultimate map -> 128x128x1 in [-1, 1].

Conditioning is conditional batch norm (class embedding -> per-channel gain and bias at every stage, as in BigGAN and
Miyato & Koyama 2018): the class modulates every resolution, which keeps small medical classes apart better than
concatenating a one-hot to z once at the input.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.optim import swa_utils

from medgan.config import ModelConfig

RESOLUTION = 128


class CondBatchNorm(nn.Module):
    def __init__(self, channels: int, embed_dim: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, affine=False)
        self.gain = nn.Linear(embed_dim, channels)
        self.bias = nn.Linear(embed_dim, channels)
        nn.init.zeros_(self.gain.weight)
        nn.init.ones_(self.gain.bias)
        nn.init.zeros_(self.bias.weight)
        nn.init.zeros_(self.bias.bias)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return self.bn(x) * self.gain(e)[:, :, None, None] + self.bias(e)[:, :, None, None]


class UpBlock(nn.Module):
    # Nearest 2x upsample + 3x3 conv (no transposed-conv checkerboard), CBN, ReLU.
    def __init__(self, cin: int, cout: int, embed_dim: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.norm = CondBatchNorm(cout, embed_dim)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        x = self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return F.relu(self.norm(x, e))


class Generator(nn.Module):
    def __init__(
        self, num_classes: int, z_dim: int = 128, width: int = 64, max_channels: int = 1024, embed_dim: int = 128
    ):
        super().__init__()
        self.num_classes, self.z_dim = num_classes, z_dim
        # Channels per resolution: width * 16 at 4x4 halving to `width` at 64x64 (DCGAN-128 widths at width=64).
        ch = {r: min(width * (64 // r), max_channels) for r in (4, 8, 16, 32, 64)}
        self.embed = nn.Embedding(num_classes, embed_dim)
        self.fc = nn.Linear(z_dim, ch[4] * 4 * 4, bias=False)
        self.fc_norm = CondBatchNorm(ch[4], embed_dim)
        self.blocks = nn.ModuleList([UpBlock(ch[r], ch[2 * r], embed_dim) for r in (4, 8, 16, 32)])
        self.out = nn.Conv2d(ch[64], 1, 3, padding=1)
        self.penultimate_channels = ch[64]

    def features(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The penultimate feature map, [B, width, 64, 64]."""
        e = self.embed(labels)
        x = self.fc(z).view(z.shape[0], -1, 4, 4)  # (B, 16w, 4, 4)
        x = F.relu(self.fc_norm(x, e))
        for block in self.blocks:  # 4 -> 8 -> 16 -> 32 -> 64
            x = block(x, e)
        return x  # (B, w, 64, 64)

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        assert z.ndim == 2 and z.shape[1] == self.z_dim, f"z must be [B, {self.z_dim}], got {tuple(z.shape)}"
        x = self.features(z, labels)
        x = self.out(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, 1, 128, 128)
        return torch.tanh(x)

    @classmethod
    def from_config(cls, cfg: ModelConfig, num_classes: int) -> Generator:
        return cls(num_classes, cfg.z_dim, cfg.width, cfg.g_max_channels, cfg.embed_dim)


def noise_for_seeds(seeds: Sequence[int], z_dim: int) -> torch.Tensor:
    """One latent per seed, drawn on the CPU from its own generator: image i depends only on seeds[i].

    Returns:
        float32 [len(seeds), z_dim].
    """
    out = torch.empty(len(seeds), z_dim)
    for i, s in enumerate(seeds):
        out[i] = torch.randn(z_dim, generator=torch.Generator().manual_seed(int(s)))
    return out


@torch.no_grad()
def generate(
    G: Generator,
    labels: Sequence[int] | np.ndarray,
    seeds: Sequence[int] | np.ndarray,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
) -> np.ndarray:
    """Images for (label, seed) pairs in eval mode, fp32: the same pairs give the same pixels.

    Returns:
        float32 [n, 1, 128, 128] in [-1, 1].
    """
    labels, seeds = np.asarray(labels, dtype=np.int64), np.asarray(seeds, dtype=np.int64)
    if labels.shape != seeds.shape:
        raise ValueError(f"labels and seeds must have the same length, got {labels.shape} and {seeds.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= G.num_classes):
        raise ValueError(f"labels must be in [0, {G.num_classes}), got {labels.min()}..{labels.max()}")
    was_training = G.training
    G.eval()
    out = np.empty((len(labels), 1, RESOLUTION, RESOLUTION), dtype=np.float32)
    for i in range(0, len(labels), batch_size):
        z = noise_for_seeds(seeds[i : i + batch_size].tolist(), G.z_dim).to(device)
        y = torch.as_tensor(labels[i : i + batch_size], device=device)
        out[i : i + len(z)] = G(z, y).float().cpu().numpy()
    G.train(was_training)
    return out


class _Packed(nn.Module):
    """G on one tensor per batch, [B, z_dim + 1]: the latents, then the label (`update_bn` passes one input)."""

    def __init__(self, G: Generator):
        super().__init__()
        self.G = G

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.G(x[:, :-1], x[:, -1].long())


def standing_stats(G: Generator, labels: np.ndarray, n_images: int, batch_size: int, seed: int) -> None:
    """Give G's batch norms the statistics of G's own weights ("standing statistics", Brock et al. 2019).

    An EMA generator averages the weights, but its running statistics would come from the trained generator's
    recent batches: statistics of other weights. torch's ``swa_utils.update_bn`` runs ``n_images // batch_size``
    batches of G in train mode, without gradients, and keeps the average of their batch means and variances, the
    normalisation G saw in training. Labels are drawn from `labels` (the training labels, so classes weigh as they did
    in training). Its own random generator leaves the global one untouched, and the same weights, `seed` and sizes
    give the same statistics.

    Args:
        G: the generator (its train/eval mode is kept).
        labels: the label pool, int64.
        n_images: images to accumulate over (at least one batch).
        batch_size: images per batch (the training batch per process).
        seed: the noise and label seed.
    """
    gen = torch.Generator().manual_seed(seed)
    pool = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    batches = []
    for _ in range(max(1, n_images // batch_size)):
        z = torch.randn(batch_size, G.z_dim, generator=gen)
        y = pool[torch.randint(0, len(pool), (batch_size,), generator=gen)]
        batches.append(torch.cat([z, y[:, None].float()], 1))
    swa_utils.update_bn(batches, _Packed(G).train(G.training), device=next(G.parameters()).device)


class LoadedGenerator:
    """A generator ready to sample, with what it was trained on (from `medgan.tracking.registry.load_generator`).

    Attributes:
        G: the EMA generator, eval mode, on the CPU.
        classes: class names, index = label.
        model_cfg: the ModelConfig it was built from.
        info: provenance: ``model_uri``, ``name``, ``version``, ``run_id``, ``dataset_hash``, ``checkpoint``
            (those known).
    """

    def __init__(self, G: Generator, classes: list[str], model_cfg: ModelConfig, info: dict | None = None):
        if G.num_classes != len(classes):
            raise ValueError(f"generator has {G.num_classes} classes but {len(classes)} class names were given")
        self.G, self.classes, self.model_cfg, self.info = G.eval(), list(classes), model_cfg, dict(info or {})

    @classmethod
    def from_state_dict(
        cls, model: dict, classes: list[str], state_dict: dict[str, torch.Tensor], info: dict | None = None
    ) -> LoadedGenerator:
        """Rebuild the generator from a ModelConfig's fields (unknown ones ignored), class names and a state_dict.

        The one rebuild behind every reference a generator is loaded from (registry, run, checkpoint).
        """
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        model_cfg = ModelConfig(**{k: v for k, v in model.items() if k in known})
        G = Generator.from_config(model_cfg, len(classes))
        G.load_state_dict(state_dict)
        return cls(G.requires_grad_(False), classes, model_cfg, info)

    def class_index(self, name_or_index: str | int) -> int:
        """Label index of a class name or index string, with an error listing the valid classes."""
        if isinstance(name_or_index, str) and name_or_index in self.classes:
            return self.classes.index(name_or_index)
        try:
            i = int(name_or_index)
        except (TypeError, ValueError):
            i = -1
        if not 0 <= i < len(self.classes):
            raise ValueError(
                f"unknown class {name_or_index!r}; this generator knows {self.classes} (or 0..{len(self.classes) - 1})"
            )
        return i
