"""Method recipes and the objectives a config lists: merged over the method's defaults, validated when read."""

from __future__ import annotations

import pytest

from pretrain.config import ConfigError, load_config
from pretrain.methods import METHODS, objective_entries, resolve_objectives
from pretrain.objectives import ITC, ITM, MLM
from pretrain.objectives.itc import ITCConfig
from pretrain.schema import PretrainConfig


def config(*overrides: str) -> PretrainConfig:
    return load_config(PretrainConfig, None, list(overrides))


def test_albef_runs_its_three_objectives_by_default():
    specs = resolve_objectives(config())
    assert [(spec.name, spec.cls, spec.weight, spec.start_step) for spec in specs] == [
        ("itc", ITC, 1.0, 0), ("itm", ITM, 1.0, 0), ("mlm", MLM, 1.0, 0)]
    assert specs[0].options == ITCConfig()
    assert {"albef", "xvlm", "vicha", "pevl"} <= set(METHODS)


def test_a_config_updates_the_defaults_adds_objectives_and_drops_one_with_weight_zero():
    chosen = config("objectives.itc.queue_size=128", "objectives.mlm.weight=0", "objectives.itm.start_step=5",
                    "objectives.extra={class_path: 'pretrain.objectives.itm:ITM', weight: 0.5}")
    assert list(objective_entries(chosen)) == ["itc", "itm", "mlm", "extra"]
    specs = {spec.name: spec for spec in resolve_objectives(chosen)}
    assert list(specs) == ["itc", "itm", "extra"]  # weight 0: not built at all
    assert specs["itc"].options.queue_size == 128 and specs["itc"].options.temp_max == 0.5
    assert (specs["itm"].start_step, specs["extra"].cls, specs["extra"].weight) == (5, ITM, 0.5)


@pytest.mark.parametrize("overrides, message", [
    (["objectives.itc.queue_sze=5"], r"unknown key objectives.itc.'queue_sze' in ITCConfig; valid keys: queue_size"),
    (["objectives.itc.temp_min=0.9"], r"objectives.itc.temp_min: must be positive and at most temp_max \(0.5\)"),
    (["objectives.nosuch={}"], r"objectives.nosuch: no built-in objective of that name \(built in: itc, itm, mlm"),
    (["objectives.mine={class_path: nowhere.module:Thing}"],
     r"objectives.mine.class_path='nowhere.module:Thing' cannot be loaded: No module named 'nowhere'"),
    (["objectives.mine={class_path: 'pretrain.config:ConfigError'}"], r"is not a subclass of .*Objective"),
    (["objectives.mine={class_path: pretrain.config}"], r"write it as package.module:ClassName"),
    (["objectives.itc=3"], r"objectives.itc: expected a mapping of options such as \{weight: 1.0\}, got 3"),
    (["objectives.itm.weight=-1"], r"objectives.itm.weight: must be a number >= 0, got -1"),
    (["objectives.itc.weight=0", "objectives.itm.weight=0", "objectives.mlm.weight=0"],
     r"every objective has weight 0"),
    (["objectives.itc.start_step=1", "objectives.itm.start_step=1", "objectives.mlm.start_step=2"],
     r"no objective runs from step 0"),
    (["method=nosuch"], r"method 'nosuch' is not known; choose one of albef"),
    (["data.streams={regions: {train: [{urls: 'r-{0..1}.tar'}]}}"],
     r"data.streams lists \['regions'\], method 'albef' reads none"),
])
def test_bad_objective_entries_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        resolve_objectives(config(*overrides))
