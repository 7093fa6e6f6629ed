"""Builders shared by pretraining and fine-tuning: the backbone, the task composed from the listed objectives."""

from __future__ import annotations

import json

import torch

from data_shards import sizes
from pretrain.build import build_task, samples_in
from pretrain.config import load_config
from pretrain.engine import plan_steps
from pretrain.methods import resolve_objectives
from pretrain.schema import PretrainConfig
from tests.pretrain.conftest import TINY_MODEL


def test_samples_in_is_the_data_layers():
    # Counting samples and checking sources live in data_shards.sizes (tested there); callers import it here.
    assert samples_in is sizes.samples_in


def tiny_config(*overrides: str) -> PretrainConfig:
    model = [f"model.{name}={json.dumps(value)}" for name, value in TINY_MODEL.items()]
    return load_config(PretrainConfig, None, model + list(overrides))


def tiny_task(*overrides: str, micro_batch: int = 2):
    config = tiny_config(*overrides)
    plan = plan_steps({"train_micro_batch_size_per_gpu": micro_batch}, 10 * micro_batch, 1, config.optim, None)
    torch.manual_seed(0)
    return build_task(config, resolve_objectives(config), plan)


def test_objective_start_steps_count_optimizer_steps():
    task, tokenizer = tiny_task("objectives.itc.queue_size=0", "objectives.itm.start_step=1",
                                "objectives.mlm.start_step=2")
    batch = {"image": torch.randn(2, 3, 32, 32), **tokenizer(["a red circle", "two blue squares"])}
    seen = []
    for step in (0, 0, 1, 2):  # the step the engine reports: two micro-batches of one accumulation window first
        task.set_step(step)
        seen.append(sorted(task(batch)))
    assert seen == [["itc", "loss"], ["itc", "loss"], ["itc", "itm", "loss"], ["itc", "itm", "loss", "mlm"]]


def test_the_method_builds_its_default_objectives_with_their_options():
    task, _ = tiny_task("objectives.itc.queue_size=20", micro_batch=2)
    assert list(task.objectives) == ["itc", "itm", "mlm"]
    assert task.objectives["itc"].queues[0].features.shape == (TINY_MODEL["embed_dim"], 20)
    assert task.momentum_towers == ("visual_encoder", "vision_proj", "text_encoder", "text_proj")
