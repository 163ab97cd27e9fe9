"""Data feeder, augmentation, losses and device setup: the pieces the loop is built from."""

from __future__ import annotations

import pytest
import torch

from medgan.config import TrainConfig
from medgan.data import DeviceFeeder, step_seed
from medgan.dataset import SliceDataset
from medgan.train import dist, losses
from medgan.train.augment import Augment, augment


def test_feeder_is_a_pure_function_of_images_seen_and_rank_disjoint(halves):
    ds = SliceDataset.open(halves)
    one = DeviceFeeder(ds, torch.device("cpu"), seed=3)
    assert len(one) == len(ds.indices("train")) and one.images.dtype == torch.float16
    # Same position, same rows, independent of call history.
    a = one.indices(1000, 16)
    one.indices(0, 16)
    assert torch.equal(a, one.indices(1000, 16))
    # Two ranks split every global batch of 16 into disjoint halves that together equal the 1-rank batch.
    r0 = DeviceFeeder(ds, torch.device("cpu"), seed=3, rank=0, world_size=2).indices(1000, 8)
    r1 = DeviceFeeder(ds, torch.device("cpu"), seed=3, rank=1, world_size=2).indices(1000, 8)
    assert torch.equal(torch.cat([r0, r1]), a)
    # One epoch visits every row once, across the epoch boundary too.
    n = len(one)
    seen = torch.cat([one.indices(k, 8) for k in range(0, n, 8)])[:n]
    assert sorted(seen.tolist()) == list(range(n))
    x, y = one.batch(n - 4, 8)  # straddles two epochs
    assert x.shape == (8, 1, 128, 128) and x.dtype == torch.float32 and y.shape == (8,)
    assert step_seed(0, 0, 8) != step_seed(0, 1, 8) != step_seed(0, 0, 16)


def test_augment_is_differentiable_keeps_range_and_identity_at_p0():
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(6, 1, 128, 128) * 2 - 1).requires_grad_(True)
    y = augment(x, torch.tensor(1.0), gen)
    assert y.shape == x.shape and not torch.equal(y, x)
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert torch.allclose(augment(x.detach(), torch.tensor(0.0), gen), x.detach(), atol=1e-6)
    black = augment(torch.full((4, 1, 128, 128), -1.0), torch.tensor(1.0), torch.Generator().manual_seed(1))
    assert black.min() >= -1.5 and black.max() <= 0.0  # fill is black; brightness shifts by at most 0.25


def test_ada_moves_p_toward_the_target():
    aug = Augment("ada", target=0.6, speed_kimg=0.1, interval=2, device=torch.device("cpu"))
    for _ in range(4):  # D calls every real image real: r_t = 1 > 0.6, so p rises
        aug.observe(torch.ones(10), batch_size=10)
    assert float(aug.p) == pytest.approx(0.4)
    for _ in range(2):
        aug.observe(-torch.ones(10), batch_size=10)
    assert float(aug.p) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="train.augment='flip'"):
        Augment("flip", 0.6, 1.0, 4, torch.device("cpu"))


def test_losses_on_logits():
    big = torch.tensor([20.0, 20.0])
    assert losses.discriminator_loss("nsgan", big, -big) < 1e-6
    assert losses.discriminator_loss("nsgan", big, -big, label_smoothing=0.1) > 0.3  # smoothed target 0.9
    assert losses.discriminator_loss("hinge", big, -big) == 0
    assert losses.generator_loss("nsgan", big) < 1e-6 and losses.generator_loss("hinge", big) == -20
    with pytest.raises(ValueError, match="nsgan"):
        losses.check_loss("wgan")
    # R1 = ||grad_x D(x)||^2: for D(x) = 3 * sum(x), 9 per pixel.
    pen, _ = losses.r1_penalty(lambda v: 3 * v.sum(dim=(1, 2, 3)), torch.zeros(2, 1, 4, 4))
    assert torch.allclose(pen, torch.full((2,), 9.0 * 16))


def test_device_and_precision_decided_once():
    env = dist.setup(TrainConfig(device="cpu", precision="fp32"))
    assert env.device.type == "cpu" and env.dtype is None and not env.compile and env.world_size == 1
    env = dist.setup(TrainConfig(device="cpu", precision="bf16"))
    assert env.dtype == torch.bfloat16
    auto = dist.setup(TrainConfig(device="cpu"))
    assert auto.dtype is None  # fp32 on the CPU unless bf16 is asked for
    with pytest.raises(ValueError, match="train.precision"):
        dist.setup(TrainConfig(device="cpu", precision="fp16"))
