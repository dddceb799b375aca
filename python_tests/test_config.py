"""Stage configuration: defaults <- YAML <- flags, typed; bad keys and values are one clear ValueError."""

from __future__ import annotations

import argparse

import pytest
import yaml

from clipcid_fast.pipeline import config


def _parse(cls, argv):
    p = argparse.ArgumentParser()
    config.add_config_flags(p, cls)
    return config.config_from_args(cls, p.parse_args(argv))


def test_precedence_defaults_yaml_flags(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text(yaml.safe_dump({"batch_size": 7, "data": {"csv_img_key": "img", "caption_noise": 0.25}}))
    cfg = _parse(config.EmbedConfig, ["--config", str(y), "--caption-noise", "0.5", "--no-progress"])
    assert cfg.batch_size == 7  # YAML over the default
    assert cfg.data.csv_img_key == "img" and cfg.data.caption_noise == 0.5  # flag over the YAML
    assert cfg.progress is False and cfg.data.corpus == "student"  # default kept
    assert isinstance(cfg, config.EmbedConfig) and isinstance(cfg.data, config.DataConfig)


def test_resolved_config_round_trips(tmp_path):
    cfg = _parse(config.EvalConfig, ["--probe-train-samples", "123", "--teacher", "ViT-B-16"])
    path = config.write_config(cfg, str(tmp_path))
    again = config.build_config(config.EvalConfig, path)
    assert again == cfg and again.models.teacher == "ViT-B-16" and again.data.corpus == "test"


def test_list_and_positional_fields():
    cfg = _parse(config.BalanceConfig, ["emb.npy", "out", "--eps", "0.01,0.2", "--k", "5"])
    assert cfg.embeddings == "emb.npy" and cfg.out_dir == "out" and cfg.eps == [0.01, 0.2] and cfg.k == 5


@pytest.mark.parametrize(
    "argv, key",
    [(["--batch-size", "abc"], "batch_size"), (["--caption-noise", "x"], "caption_noise")],
)
def test_bad_value_names_the_key(argv, key):
    with pytest.raises(ValueError, match=key):
        _parse(config.EmbedConfig, argv)


def test_unknown_yaml_key_and_missing_file(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text(yaml.safe_dump({"data": {"no_such_key": 1}}))
    with pytest.raises(ValueError, match="no_such_key"):
        _parse(config.EmbedConfig, ["--config", str(y)])
    with pytest.raises(ValueError, match="no such file"):
        _parse(config.EmbedConfig, ["--config", str(tmp_path / "missing.yaml")])


def test_missing_positional_is_named():
    with pytest.raises(ValueError, match="embeddings"):
        _parse(config.BalanceConfig, [])
