"""Config: defaults, overlays, --set coercion, unknown keys, and every shipped YAML loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from medgan.config import Config, ConfigError, TrainConfig, flatten, from_dict, load_config, to_dict

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


def test_a_misspelt_key_gets_the_nearest_one():
    with pytest.raises(ConfigError, match=r"did you mean ingest\.min_foreground_fraction\?"):
        load_config(sets=["ingest.min_foregound_fraction=0"])


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


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["train.batch_size=0"], "train.batch_size=0: must be >= 1 (default 32)"),
        (["train.total_kimg=-1"], "train.total_kimg=-1.0: must be > 0 (default 200.0)"),
        (["train.augment=adaa"], "train.augment='adaa': must be one of diffaug, ada, none (default 'diffaug')"),
        (["train.loss=wgan"], "train.loss='wgan': must be one of nsgan, hinge (default 'nsgan')"),
        (["train.precision=fp16"], "train.precision='fp16': must be one of auto, bf16, fp32 (default 'auto')"),
        (["train.device=gpu"], "train.device='gpu': must be one of auto, cpu, cuda, cuda:N (default 'auto')"),
        (["export.format=jpeg"], "export.format='jpeg': must be one of png, npy, nifti, dicom (default 'png')"),
        (
            ["ingest.split_fractions=[0.8, -0.1, 0.3]"],
            "ingest.split_fractions=[0.8, -0.1, 0.3]: must be 3 non-negative",
        ),
        (["ingest.ct_window=40:0"], "ingest.ct_window='40:0': must be one of abdomen, brain, lung, bone, custom"),
    ],
)
def test_a_bad_value_is_refused_when_the_config_is_built(sets, message):
    with pytest.raises(ConfigError) as e:
        load_config(sets=sets)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_good_values_pass_and_a_section_built_directly_is_checked():
    cfg = load_config(sets=["train.device=cuda:1", "ingest.ct_window=-600:1500", "model.d_reduce_channels=none"])
    assert (cfg.train.device, cfg.ingest.ct_window, cfg.model.d_reduce_channels) == ("cuda:1", "-600:1500", None)
    with pytest.raises(ConfigError, match=r"train.batch_size=0: must be >= 1"):
        TrainConfig(batch_size=0)
    with pytest.raises(ConfigError, match=r"export.batch_size=-3"):
        load_config(overrides={"export.batch_size": -3})  # command options are checked too


def test_malformed_yaml_is_one_line_with_file_line_and_column(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  batch_size: 8\n   loss: hinge\n")
    with pytest.raises(ConfigError) as e:
        load_config([p])
    assert str(e.value) == f"{p}:3:8: not valid YAML (mapping values are not allowed here); fix the syntax there"


def test_the_cli_prints_one_line_and_exits_2(tmp_path):
    from click.testing import CliRunner

    from medgan.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  loss: [hinge\n")
    for args in (["--set", "train.batch_size=0"], ["--set", "train.total_kimg=-1"], ["--config", str(bad)]):
        res = CliRunner().invoke(main, ["train", "--data", str(tmp_path), "--dry-run", *args])
        assert res.exit_code == 2, res.output
        assert res.output.count("\n") == 1 and res.output.startswith("medgan: error: ")
    ok = CliRunner().invoke(main, ["train", "--data", str(tmp_path), "--dry-run", "--set", "train.batch_size=4"])
    assert ok.exit_code == 0 and "batch_size: 4" in ok.output
