"""Shapes of the generator and the channel-reduced discriminator, pinned."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medgan.config import ModelConfig
from medgan.models.discriminator import Discriminator
from medgan.models.generator import Generator, generate, noise_for_seeds


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_generator_penultimate_map_and_output():
    G = Generator(num_classes=3, z_dim=16, width=8, max_channels=64, embed_dim=8)
    z, y = torch.randn(2, 16), torch.tensor([0, 2])
    assert G.features(z, y).shape == (2, 8, 64, 64)
    x = G(z, y)
    assert x.shape == (2, 1, 128, 128)
    assert x.abs().max() <= 1.0


def test_default_widths_are_the_issue_design():
    # Defaults: the penultimate map is 64x64x64, D's stem 64x64x64 reduced to 32 channels by a 1x1 conv.
    cfg = ModelConfig()
    G = Generator.from_config(cfg, num_classes=2)
    D = Discriminator.from_config(cfg, num_classes=2)
    assert G.penultimate_channels == 64
    assert G.fc.out_features == 1024 * 4 * 4  # DCGAN-128 widths: 1024 channels at 4x4
    conv = D.reduce[0]
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1)
    assert (conv.in_channels, conv.out_channels) == (64, 32)
    with torch.no_grad():
        h = D.stem_features(torch.zeros(1, 1, 128, 128))
    assert h.shape == (1, 64, 64, 64)


@pytest.mark.parametrize("reduce", [4, 2, None])
def test_discriminator_reduction_is_configurable(reduce):
    D = Discriminator(num_classes=2, width=8, max_channels=32, reduce_channels=reduce, spectral_norm=True)
    x, y = torch.randn(3, 1, 128, 128), torch.tensor([0, 1, 1])
    assert D.stem_features(x).shape == (3, 8, 64, 64)
    assert D.features(x).shape == (3, 8 if reduce is None else reduce, 64, 64)
    if reduce is None:
        assert isinstance(D.reduce, nn.Identity)
    else:
        assert D.reduce[0].kernel_size == (1, 1)
    logits = D(x, y)
    assert logits.shape == (3,)
    # Logits, never probabilities: no Sigmoid anywhere in the model.
    assert not any(isinstance(m, nn.Sigmoid) for m in D.modules())


def test_discriminator_projection_uses_the_label():
    D = Discriminator(num_classes=2, width=8, max_channels=32, reduce_channels=4, spectral_norm=False)
    x = torch.randn(1, 1, 128, 128)
    with torch.no_grad():
        nn.init.normal_(D.embed.weight)
        a, b = D(x, torch.tensor([0])), D(x, torch.tensor([1]))
    assert not torch.allclose(a, b)


def test_discriminator_rejects_wrong_shapes():
    D = Discriminator(num_classes=2, width=8, max_channels=32)
    with pytest.raises(AssertionError, match=r"\[B, 1, 128, 128\]"):
        D(torch.zeros(1, 1, 64, 64), torch.tensor([0]))
    with pytest.raises(ValueError, match="reduce_channels"):
        Discriminator(num_classes=2, reduce_channels=0)


def test_spectral_norm_option():
    on = Discriminator(num_classes=2, width=8, max_channels=32, spectral_norm=True)
    off = Discriminator(num_classes=2, width=8, max_channels=32, spectral_norm=False)
    assert any("parametrizations" in k for k in on.state_dict())
    assert not any("parametrizations" in k for k in off.state_dict())


def test_generate_is_deterministic_per_label_and_seed():
    G = Generator(num_classes=2, z_dim=16, width=8, max_channels=32, embed_dim=8)
    a = generate(G, [0, 1, 1], [5, 6, 7])
    b = generate(G, [1, 0], [6, 5])
    assert a.shape == (3, 1, 128, 128)
    assert (a[1] == b[0]).all() and (a[0] == b[1]).all()
    assert torch.equal(noise_for_seeds([3], 16)[0], noise_for_seeds([1, 3], 16)[1])


def test_class_head_beside_the_projection_logit():
    # model.class_loss > 0 adds an auxiliary classifier on D's pooled features; 0 builds the same D as before.
    cfg = ModelConfig(width=8, d_max_channels=32, d_reduce_channels=4)
    plain = Discriminator.from_config(cfg, num_classes=3)
    assert plain.classify is None and not any("classify" in k for k in plain.state_dict())
    cfg.class_loss = 0.5
    D = Discriminator.from_config(cfg, num_classes=3).eval()  # eval: spectral norm's power iteration stands still
    x, y = torch.randn(4, 1, 128, 128), torch.tensor([0, 1, 2, 0])
    logits, cls = D(x, y, with_class=True)
    assert logits.shape == (4,) and cls.shape == (4, 3)
    assert torch.equal(D(x, y), logits)  # the real/fake logit is the same with or without the class head's output
    assert D.features(x).shape == (4, 4, 64, 64)  # the 1x1 reduction is untouched
    with pytest.raises(AssertionError, match="class head"):
        plain(x, y, with_class=True)
