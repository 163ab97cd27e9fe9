"""Health watch: the overpowering alarm fires on an overpowered D and stays quiet on the default; NaN stops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from train_helpers import halves_dataset, tiny_config

from medgan import checkpoint
from medgan.train import losses
from medgan.train.loop import train
from medgan.train.monitor import Monitor, diversity


@pytest.fixture(scope="module")
def speckle(tmp_path_factory):
    # Bright halves with heavy per-pixel speckle: easy for D to tell apart, slow for a young G to imitate.
    return halves_dataset(tmp_path_factory.mktemp("data") / "speckle", noise=0.6)


def test_overpowering_fires_on_the_unreduced_small_batch_design(speckle, tmp_path, tracker):
    # The failure of the issue: batch 4, no 1x1 reduction, no spectral norm/augmentation/R1, D lr x10 (and G lr / 10).
    cfg = tiny_config(total_kimg=0.8, batch_size=4, lr_d=2e-3, lr_g=2e-5, augment="none", r1_gamma=0.0)
    cfg.model.d_reduce_channels, cfg.model.spectral_norm = None, False
    cfg.train.log_every_kimg, cfg.train.sample_every_kimg, cfg.train.ckpt_every_kimg = 0.064, 0.8, 0.8
    result = train(cfg, speckle, out_dir=tmp_path, resume=None, preset="t", tracker=tracker)
    assert any(a.startswith("discriminator overpowering") for a in result.alarms), result.alarms
    assert "alarm/discriminator_overpowering" in tracker.tags
    assert max(m.get("alarm/d_overpowering", 0.0) for _, m in tracker.metrics) == 1.0
    assert "WARNING: discriminator overpowering" in result.summary()


def test_overpowering_quiet_on_the_default_design(speckle, tmp_path, tracker):
    cfg = tiny_config(total_kimg=0.4)
    cfg.train.log_every_kimg, cfg.train.sample_every_kimg, cfg.train.ckpt_every_kimg = 0.064, 0.2, 0.4
    result = train(cfg, speckle, out_dir=tmp_path, resume=None, preset="t", tracker=tracker)
    assert result.alarms == []
    assert all(m.get("alarm/d_overpowering", 0.0) == 0.0 for _, m in tracker.metrics)
    assert not any(k.startswith("alarm/") for k in tracker.tags)


def test_nan_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(halves, tmp_path, tracker, monkeypatch):
    real_loss, calls = losses.discriminator_loss, []

    def poisoned(*args, **kwargs):
        calls.append(1)
        out = real_loss(*args, **kwargs)
        return out * float("nan") if len(calls) > 10 else out  # after the checkpoint at 64 images (8 steps)

    monkeypatch.setattr(losses, "discriminator_loss", poisoned)
    cfg = tiny_config(total_kimg=0.256)
    with pytest.raises(RuntimeError, match=r"NaN/inf.*last good checkpoint is .*ckpt-000000064\.pt"):
        train(cfg, halves, out_dir=tmp_path, resume=None, preset="t", tracker=tracker)
    (run_dir,) = tmp_path.iterdir()
    assert checkpoint.latest(run_dir).name == "ckpt-000000064.pt"
    state = checkpoint.load(checkpoint.latest(run_dir))
    assert all(torch.isfinite(v).all() for v in state["G"].values() if v.is_floating_point())
    assert tracker.finished == "FAILED"


def test_monitor_rules():
    mon = Monitor(torch.device("cpu"), patience=3)
    healthy = {"loss/d": 1.0, "d/acc_real": 0.8, "d/acc_fake": 0.7}
    strong = {"loss/d": 5e-4, "d/acc_real": 0.9, "d/acc_fake": 0.9}
    assert mon.check_overpowering(strong, 1)["alarm/d_overpowering"] == 0
    assert mon.check_overpowering(strong, 2)["alarm/d_overpowering"] == 0
    assert mon.check_overpowering(healthy, 3)["alarm/d_overpowering"] == 0  # a healthy interval resets the streak
    perfect = {"loss/d": 0.02, "d/acc_real": 1.0, "d/acc_fake": 0.995}
    flags = [mon.check_overpowering(perfect, k)["alarm/d_overpowering"] for k in range(4)]
    assert flags == [0, 0, 1, 1] and len(mon.alarms) == 1  # fires once, stays flagged

    # Mode collapse: a fall of within-class diversity, not the low diversity of a fresh G.
    rng = np.random.default_rng(0)
    labels = np.array([0] * 4 + [1] * 4)
    varied = rng.standard_normal((8, 1, 8, 8))
    same = np.repeat(varied[:1], 8, axis=0) + 1e-3 * rng.standard_normal((8, 1, 8, 8))
    ref = np.array([diversity(varied[:4]), diversity(varied[4:])])
    mon = Monitor(torch.device("cpu"), patience=2)
    assert mon.check_collapse(same, labels, ref, 0)["alarm/mode_collapse"] == 0
    assert mon.check_collapse(same, labels, ref, 1)["alarm/mode_collapse"] == 0  # never diverse yet: a fresh G
    assert mon.check_collapse(varied, labels, ref, 2)["health/diversity_ratio"] == pytest.approx(1.0)
    mon.check_collapse(same, labels, ref, 3)
    assert mon.check_collapse(same, labels, ref, 4)["alarm/mode_collapse"] == 1
    assert mon.alarms[-1].startswith("mode collapse")


def test_non_finite_metrics_raise():
    with pytest.raises(RuntimeError, match="loss/g became NaN/inf.*no checkpoint was written"):
        Monitor.check_finite({"loss/d": 1.0, "loss/g": float("inf")}, 0.5, None)
