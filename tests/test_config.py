"""Config: defaults, overlays, --set coercion, unknown keys, and every shipped YAML loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from medgan.config import Config, ConfigError, flatten, from_dict, load_config, to_dict

ROOT = Path(__file__).resolve().parents[1]


def test_set_coerces_types_and_none():
    cfg = load_config(
        sets=[
            "train.batch_size=64",
            "model.d_reduce_channels=none",
            "train.betas=[0.0, 0.99]",
            "track.register=false",
            "train.compile=true",
        ]
    )
    assert cfg.train.batch_size == 64
    assert cfg.model.d_reduce_channels is None
    assert cfg.train.betas == [0.0, 0.99]
    assert cfg.track.register is False
    assert cfg.train.compile == "true"


@pytest.mark.parametrize("bad", ["train.batchsize=3", "nosuch.x=1", "batch_size=3"])
def test_unknown_keys_list_valid_ones(bad):
    with pytest.raises(ConfigError) as e:
        load_config(sets=[bad])
    assert "Unknown config key" in str(e.value)


def test_bad_value_names_the_key():
    with pytest.raises(ConfigError, match="train.batch_size"):
        load_config(sets=["train.batch_size=lots"])


def test_overlay_unknown_key_names_file(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("train:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"x\.yaml.*lr"):
        load_config([p])


def test_round_trip_and_flatten():
    cfg = load_config(sets=["ingest.mask_labels={5: liver}", "model.width=32"])
    again = from_dict(to_dict(cfg))
    assert again == cfg
    flat = flatten(cfg)
    assert flat["model.width"] == "32" and flat["ingest.mask_labels"] == "{'5': 'liver'}"


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_config_loads(path):
    cfg = load_config([path])
    assert isinstance(cfg, Config)
    assert from_dict(to_dict(cfg)) == cfg
