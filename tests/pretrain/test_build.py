"""Builders of the entry point: sample counts from sizes.json, the LR schedule, ds_config adjustments."""

from __future__ import annotations

import json
import math

import pytest
import torch

from data_shards import sizes
from pretrain.build import ds_config_for, lr_schedule, samples_in
from pretrain.config import ConfigError
from pretrain.schema import OptimConfig


def test_samples_in_is_the_data_layers():
    # Counting samples and checking sources live in data_shards.sizes (tested there); callers import it here.
    assert samples_in is sizes.samples_in


def test_lr_schedule_warms_up_linearly_then_follows_the_cosine():
    optim = OptimConfig(lr=1e-3, warmup_lr=1e-5, min_lr=1e-4, warmup_steps=10)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=optim.lr)
    schedule = lr_schedule(optimizer, optim, steps_per_epoch=10, total_steps=110)
    lrs = []
    for _ in range(111):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs[0] == pytest.approx(1e-5) and lrs[5] == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)
    assert lrs[10] == pytest.approx(1e-3)
    assert lrs[60] == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + math.cos(math.pi * 0.5)))
    assert lrs[110] == pytest.approx(1e-4)


def test_ds_config_gets_the_yaml_optimizer_and_cpu_notes(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "AdamW"}}))
    config, notes = ds_config_for(str(path), OptimConfig(lr=2e-4, weight_decay=0.05))
    params = config["optimizer"]["params"]
    assert (params["lr"], params["weight_decay"]) == (2e-4, 0.05)
    if not torch.cuda.is_available():
        assert params["torch_adam"] is True and any("AdamW from torch" in note for note in notes)
    path.write_text("{}")
    with pytest.raises(ConfigError, match="set train_micro_batch_size_per_gpu"):
        ds_config_for(str(path), OptimConfig())
    with pytest.raises(ConfigError, match="does not exist"):
        ds_config_for(str(tmp_path / "missing.json"), OptimConfig())


def test_objective_start_steps_switch_terms_on_at_their_step():
    from pretrain.build import build_task
    from pretrain.config import load_config
    from pretrain.schema import PretrainConfig
    from tests.pretrain.conftest import TINY_MODEL

    overrides = [f"model.{name}={json.dumps(value)}" for name, value in TINY_MODEL.items()]
    config = load_config(PretrainConfig, None, overrides + ["objectives.queue_size=0",
                                                            "objectives.start_steps={itm: 1, mlm: 2}"])
    torch.manual_seed(0)
    task, tokenizer = build_task(config, 2, 10)
    batch = {"image": torch.randn(2, 3, 32, 32), **tokenizer(["a red circle", "two blue squares"])}
    seen = [sorted(task(batch)) for _ in range(3)]
    assert seen == [["itc", "loss"], ["itc", "itm", "loss"], ["itc", "itm", "loss", "mlm"]]
    bad = load_config(PretrainConfig, None, overrides + ["objectives.queue_size=0", "objectives.start_steps={mim: 3}"])
    with pytest.raises(ValueError, match=r"start_steps names unknown terms \['mim'\]"):
        build_task(bad, 2, 10)
