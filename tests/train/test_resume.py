"""Exact resume: 256 images straight equals 128 + resume + 128, bit for bit on CPU; checkpoints refuse other data."""

from __future__ import annotations

import pytest
import torch
from train_helpers import halves_dataset, tiny_config

from medgan import checkpoint
from medgan.tracking.registry import load_generator
from medgan.train.loop import train


def _cfg(total_kimg: float):
    # ADA with an interval that does not divide the checkpoint step, so its accumulator must be restored too.
    cfg = tiny_config(total_kimg=total_kimg, augment="ada", ada_kimg=0.2, ada_interval=3, r1_interval=5)
    cfg.train.log_every_kimg, cfg.train.ckpt_every_kimg = 0.048, 0.128
    return cfg


def _assert_equal(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_equal(x, y, f"{path}[{i}]")


def test_resume_is_exact(halves, tmp_path, tracker):
    straight = train(_cfg(0.256), halves, out_dir=tmp_path / "a", resume=None, preset="t", tracker=tracker)
    first = train(_cfg(0.128), halves, out_dir=tmp_path / "b", resume=None, preset="t", tracker=tracker)
    assert first.checkpoint.name == "ckpt-000000128.pt"
    resumed = train(_cfg(0.256), halves, out_dir=tmp_path / "b", resume=str(first.run_dir), preset="t", tracker=tracker)
    assert resumed.run_dir == first.run_dir and resumed.checkpoint.name == "ckpt-000000256.pt"

    a, b = checkpoint.load(straight.checkpoint), checkpoint.load(resumed.checkpoint)
    assert a["images_seen"] == b["images_seen"] == 256 and a["d_step"] == b["d_step"]
    for key in ("G", "D", "G_ema", "opt_g", "opt_d"):
        _assert_equal(a[key], b[key], key)
    assert a["augment"] == b["augment"] and 0 < a["augment"]["p"]

    # A checkpoint file works as --resume too; a finished run has nothing left to do.
    again = train(
        _cfg(0.256), halves, out_dir=tmp_path / "b", resume=str(resumed.checkpoint), preset="t", tracker=tracker
    )
    assert again.images_seen == 256


def test_resume_refuses_another_dataset(halves, tmp_path, tracker):
    first = train(tiny_config(total_kimg=0.032), halves, out_dir=tmp_path, resume=None, preset="t", tracker=tracker)
    other = halves_dataset(tmp_path / "other", n_per_class=16, seed=1)
    with pytest.raises(ValueError, match="content hash .* resume with the same dataset"):
        train(
            tiny_config(total_kimg=0.064),
            other,
            out_dir=tmp_path,
            resume=str(first.run_dir),
            preset="t",
            tracker=tracker,
        )
    with pytest.raises(FileNotFoundError, match="no ckpt"):
        checkpoint.resolve(tmp_path)


def test_checkpoint_contents_and_loader(halves, tmp_path, tracker):
    result = train(tiny_config(total_kimg=0.032), halves, out_dir=tmp_path, resume=None, preset="t", tracker=tracker)
    state = torch.load(result.checkpoint, weights_only=True)  # plain data only: no pickled modules
    for key in ("G", "D", "G_ema", "opt_g", "opt_d", "augment", "rng", "config", "classes", "dataset_hash"):
        assert key in state
    assert state["config"]["model"]["width"] == 8 and state["classes"] == ["left", "right"]
    loaded = load_generator(result.run_dir)
    assert not loaded.G.training and next(loaded.G.parameters()).device.type == "cpu"
    assert loaded.info == {
        "checkpoint": str(result.checkpoint),
        "dataset_hash": state["dataset_hash"],
        "run_id": None,
        "spacing_mm": 1.0,  # the training data's geometry travels with the generator (exports state it)
        "modality": "MR",
    }
    bad = tmp_path / "ckpt-000000001.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable medgan checkpoint"):
        checkpoint.load(bad)


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_resume_passes_over_a_damaged_newest_checkpoint(halves, tmp_path, tracker, damage):
    first = train(tiny_config(total_kimg=0.032), halves, out_dir=tmp_path, resume=None, preset="t")
    good = first.checkpoint
    newer = good.with_name(checkpoint.checkpoint_name(64))  # what a save cut short at 64 images would leave
    newer.write_bytes(good.read_bytes()[: good.stat().st_size // 2] if damage == "truncated" else b"")
    with pytest.raises(ValueError, match="not a readable medgan checkpoint"):
        checkpoint.load(newer)
    why = "empty" if damage == "empty" else "truncated"
    skipped = rf"skipped the newer checkpoint\(s\) {newer.name} \(.*{why}.*\); resuming from {good.name}"
    with pytest.warns(UserWarning, match=skipped):
        path, state = checkpoint.load_latest(first.run_dir)
    assert path == good and state["images_seen"] == 32
    with pytest.warns(UserWarning, match=f"resuming from {good.name}"):
        resumed = train(tiny_config(total_kimg=0.064), halves, out_dir=tmp_path, resume=str(first.run_dir), preset="t")
    assert resumed.images_seen == 64 and resumed.checkpoint == newer  # the step's save replaced the damaged file
    assert checkpoint.load(newer)["images_seen"] == 64
    good.write_bytes(b"")
    newer.write_bytes(b"\0" * 100)
    with pytest.raises(ValueError, match=f"no checkpoint there is readable \\({newer.name}, {good.name}\\)"):
        checkpoint.load_latest(first.run_dir)
