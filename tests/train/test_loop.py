"""A short real training on two separable classes: G must learn which half of the image each class lights up."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from train_helpers import tiny_config

from medgan import checkpoint
from medgan.dataset import SliceDataset
from medgan.models.discriminator import Discriminator
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


def _bn_input_stats(G: torch.nn.Module, n_batches: int, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each batch norm's per-channel input mean and variance (averaged over batches), G in train mode on fresh noise:
    the statistics its own weights produce."""
    norms = [m for m in G.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    sums = [[torch.zeros(m.num_features, dtype=torch.float64) for _ in range(2)] for m in norms]

    def record(i: int):
        def hook(module, inputs) -> None:
            x = inputs[0].double()
            sums[i][0].add_(x.mean((0, 2, 3)))
            sums[i][1].add_(x.var((0, 2, 3)))

        return hook

    hooks = [m.register_forward_pre_hook(record(i)) for i, m in enumerate(norms)]
    g = torch.Generator().manual_seed(99)
    G.train()
    with torch.no_grad():
        for _ in range(n_batches):
            z = torch.randn(batch_size, G.z_dim, generator=g)
            G(z, torch.randint(0, G.num_classes, (batch_size,), generator=g))
    G.eval()
    for h in hooks:
        h.remove()
    return [(m / n_batches, v / n_batches) for m, v in sums]


def test_the_ema_generator_normalises_with_its_own_statistics(halves, tmp_path, tracker):
    # The EMA generator's weights differ from the trained G's, so the trained G's running statistics misnormalise it:
    # the saved G_ema carries the statistics of its own activations (train.standing_stats), G's with 0.
    ckpt = {
        n: train(tiny_config(total_kimg=0.5, standing_stats=n), halves, out_dir=tmp_path / str(n), resume=None,
                 preset="t", tracker=tracker).checkpoint
        for n in (512, 0)
    }  # fmt: skip
    standing, copied = (torch.load(ckpt[n], weights_only=True) for n in (512, 0))
    means = [k for k in standing["G_ema"] if k.endswith("running_mean")]
    assert len(means) == 5  # the 4x4 stem and the four up blocks
    for k in means:  # with 0, the buffers are G's; the weights (and so everything else) train the same either way
        assert torch.equal(copied["G_ema"][k], copied["G"][k])
        assert torch.equal(standing["G"][k], copied["G"][k])

    loaded = load_generator(ckpt[512])
    own = _bn_input_stats(loaded.G, n_batches=128, batch_size=8)

    def misfit(state: dict) -> float:  # mean and variance error, in units of the layer's own standard deviation
        errors = []
        for k, (mean, var) in zip(means, own, strict=True):
            rm, rv = state[k].double(), state[k.replace("running_mean", "running_var")].double()
            errors.append(((rm - mean).abs() / var.sqrt()).mean() + (rv / var - 1).abs().mean())
        return float(max(errors))

    assert misfit(standing["G_ema"]) < 0.2  # its own statistics, up to sampling
    assert misfit(copied["G_ema"]) > 2 * misfit(standing["G_ema"])  # G's statistics are another generator's


def test_the_class_loss_teaches_d_the_classes_and_resumes(halves, tmp_path, tracker):
    # model.class_loss: D's class head learns the real images' classes; the head travels in the checkpoint.
    cfg = tiny_config(total_kimg=0.512, augment="none", lr_d=5e-4)
    cfg.model.class_loss = 0.5
    first = train(cfg, halves, out_dir=tmp_path, resume=None, preset="test", tracker=tracker)
    state = checkpoint.load(first.checkpoint)
    assert state["config"]["model"]["class_loss"] == 0.5 and any("classify" in k for k in state["D"])
    D = Discriminator.from_config(cfg.model, 2)
    D.load_state_dict(state["D"])
    ds = SliceDataset.open(halves)
    x, y = torch.tensor(np.array(ds.images[:64])).float(), torch.tensor(ds.labels[:64]).long()
    with torch.no_grad():
        _, cls = D(x, y, with_class=True)
    assert (cls.argmax(1) == y).float().mean() >= 0.9

    cfg.train.total_kimg = 0.576  # resume reads the head back (strict load) and keeps training it
    resumed = train(cfg, halves, out_dir=tmp_path, resume=str(first.run_dir), preset="test", tracker=tracker)
    assert resumed.checkpoint.name == "ckpt-000000576.pt"
