"""Engine setup shared by pretraining and fine-tuning: ds_config adjustments, the LR schedule, the step plan."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pretrain.config import ConfigError
from pretrain.engine import ds_config_for, lr_schedule, plan_steps
from pretrain.schema import OptimConfig


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


def test_the_step_plan_counts_optimizer_steps():
    ds_config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}
    plan = plan_steps(ds_config, 100, 3, OptimConfig(epochs=5), max_steps=7)
    assert (plan.steps_per_epoch, plan.schedule_steps, plan.total_steps) == (4, 20, 7)
    assert (plan.global_batch, plan.samples_per_step) == (12, 24)
    with pytest.raises(ConfigError, match="10 samples per epoch give no full step of 4 x 3 ranks x 2 accumulation"):
        plan_steps(ds_config, 10, 3, OptimConfig(), None)
