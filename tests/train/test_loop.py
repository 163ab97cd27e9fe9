"""A short real training on two separable classes: G must learn which half of the image each class lights up."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from train_helpers import tiny_config

from medgan.models.generator import generate
from medgan.tracking.registry import load_generator
from medgan.train.loop import train


def test_generator_learns_the_classes(halves, tmp_path, tracker):
    # Plain setup (no augmentation) with a higher lr so ~250 steps on a width-8 model are enough.
    cfg = tiny_config(total_kimg=2.0, batch_size=8, augment="none", lr_g=5e-4, lr_d=5e-4)
    cfg.train.log_every_kimg, cfg.train.sample_every_kimg, cfg.train.ckpt_every_kimg = 0.5, 1.0, 1.0
    result = train(cfg, halves, out_dir=tmp_path, resume=None, preset="test", tracker=tracker)

    loaded = load_generator(result.checkpoint)
    x = generate(loaded.G, [0] * 16 + [1] * 16, list(range(16)) * 2)
    left_minus_right = x[..., :64].mean(axis=(1, 2, 3)) - x[..., 64:].mean(axis=(1, 2, 3))
    # Class 'left' lights the left half, class 'right' the right half: same noise, opposite sides.
    assert np.median(left_minus_right[:16]) > 0.3
    assert np.median(left_minus_right[16:]) < -0.3
    assert (left_minus_right[:16] > left_minus_right[16:]).mean() >= 0.9

    # The run's contract: name, checkpoint naming, provenance, tracker calls with steps.
    assert result.run_dir.name.startswith("halves-test-") and result.run_dir.parent == tmp_path
    assert result.checkpoint.name == "ckpt-000002000.pt"
    assert sorted(p.name for p in result.run_dir.glob("ckpt-*.pt")) == ["ckpt-000001000.pt", "ckpt-000002000.pt"]
    assert loaded.classes == ["left", "right"] and loaded.info["checkpoint"] == str(result.checkpoint)
    steps = [s for s, m in tracker.metrics if "loss/d" in m]
    assert len(steps) == 4 and steps == sorted(steps) and steps[-1] == 2000  # images seen
    keys = set(tracker.metrics[-1][1]) | set(tracker.metrics[-2][1])
    for k in ("loss/d", "loss/g", "d/prob_real", "d/prob_fake", "d/acc_real", "d/acc_fake", "d/r_t", "aug/p",
              "grad/g", "grad/d", "perf/img_per_s", "health/diversity_ratio"):  # fmt: skip
        assert k in keys
    assert ("samples/left", 2000, (132, 4 * 130 + 2)) in tracker.images
    assert tracker.params["model.d_reduce_channels"] == "4" and tracker.finished == "FINISHED"
    assert result.alarms == [] and "halves-test-" in result.summary()
    health = result.run_dir / "health.png"  # the end-of-run loss/health figure, logged as an artifact
    assert health.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and health in [Path(p) for p in tracker.artifacts]


def test_every_train_preset_resolves_and_the_gpu_recipe_steps_on_cpu(halves, tmp_path):
    """The shipped recipes parse; the GPU recipe's model and step run as-is (bf16 autocast, channels_last) on CPU."""
    from medgan.config import load_config

    root = Path(__file__).resolve().parents[2] / "configs" / "train"
    presets = sorted(root.glob("*.yaml"))
    assert {p.stem for p in presets} >= {"cpu_smoke", "gpu", "cpu_brain", "ablation"}
    for p in presets:
        load_config([p])
    cfg = load_config(
        [root / "gpu.yaml"],
        ["train.device=cpu", "train.total_kimg=0.032", "train.log_every_kimg=0.016", "train.sample_every_kimg=0.032",
         "train.ckpt_every_kimg=0.032", "train.samples_per_class=2", "train.progress=false", "track.enabled=false"],
    )  # fmt: skip
    assert (cfg.model.width, cfg.model.d_reduce_channels, cfg.train.batch_size) == (64, 32, 64)
    cfg.train.batch_size = 16  # the recipe's full-width model, two small steps
    result = train(cfg, halves, out_dir=tmp_path, resume=None, preset="gpu")
    assert result.checkpoint.name == "ckpt-000000032.pt"
    x = generate(load_generator(result.checkpoint).G, [0, 1], [0, 1])
    assert x.shape == (2, 1, 128, 128) and np.isfinite(x).all()


def test_a_wall_clock_budget_ends_the_run_saved_and_registered(halves, tmp_path, tracker):
    # train.max_minutes ends training at the first log point past the budget: checkpoint, samples and registration
    # happen as at total_kimg, the checkpoint records where it stopped, and the run says why it is short.
    cfg = tiny_config(total_kimg=1.0, max_minutes=1e-4)  # 6 ms: the first log point (32 images) is past it
    result = train(cfg, halves, out_dir=tmp_path, resume=None, preset="test", tracker=tracker)
    assert result.images_seen == 32 and result.checkpoint.name == "ckpt-000000032.pt"
    assert tracker.finished == "FINISHED" and tracker.registered == 32
    assert tracker.tags["medgan.stopped_by"] == "train.max_minutes=0.0001"
    assert any(name.startswith("samples/") and step == 32 for name, step, _ in tracker.images)
