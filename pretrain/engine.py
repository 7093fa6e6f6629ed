"""Starting a DeepSpeed engine the same way for pretraining and every fine-tuning task.

``ds_config_for`` reads a ``ds_configs/*.json`` file, fills the optimizer's hyperparameters from the
experiment YAML, and makes the few adjustments a CPU-only machine needs, each returned as a note for the
log. ``plan_steps`` turns the epoch's samples into optimizer steps (micro-batch, accumulation and world
size read back from that config), and ``start_engine`` hands a module, its parameter groups and the
warm-up + cosine schedule to ``deepspeed.initialize``::

    ds_config, notes = ds_config_for(args.deepspeed_config, config.optim)
    plan = plan_steps(ds_config, samples_per_epoch, world, config.optim, config.run.max_steps)
    engine = start_engine(task, task.parameter_groups(config.optim.weight_decay), ds_config, config.optim, plan)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LambdaLR

from pretrain.config import ConfigError
from pretrain.schema import OptimConfig


def ds_config_for(path: str, optim: OptimConfig) -> tuple[dict, list[str]]:
    """The DeepSpeed config to run with, plus notes on anything changed for this machine."""
    try:
        with open(path) as handle:
            ds_config = json.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"--deepspeed_config {path!r} does not exist; see ds_configs/") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"--deepspeed_config {path!r} is not valid JSON: {error}") from None
    notes = []
    if "train_micro_batch_size_per_gpu" not in ds_config:
        raise ConfigError(f"{path}: set train_micro_batch_size_per_gpu (the per-rank batch)")
    optimizer = ds_config.setdefault("optimizer", {"type": "AdamW"})
    optimizer.setdefault("params", {}).update(lr=optim.lr, betas=list(optim.betas), eps=optim.eps,
                                              weight_decay=optim.weight_decay)
    if not torch.cuda.is_available():
        from deepspeed.accelerator import get_accelerator

        offloaded = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") == "cpu"
        if not offloaded and not optimizer["params"].get("torch_adam"):
            optimizer["params"]["torch_adam"] = True
            notes.append("CPU run: AdamW from torch (DeepSpeed's FusedAdam is a GPU kernel)")
        if ds_config.get("fp16", {}).get("enabled") and not get_accelerator().is_fp16_supported():
            ds_config["fp16"]["enabled"] = False
            ds_config["bf16"] = {"enabled": True}
            notes.append("CPU run: this CPU lacks fp16 support in DeepSpeed; fp16 downgraded to bf16")
    return ds_config, notes


def lr_schedule(optimizer, optim: OptimConfig, steps_per_epoch: int, total_steps: int) -> LambdaLR:
    """``optim.schedule``: ``cosine`` is a linear warm-up from ``warmup_lr`` to ``lr`` over ``warmup_steps``, then
    cosine to ``min_lr``; ``linear`` (X-VLM's) rises from 0 to ``lr`` over ``warmup_steps``, then falls linearly
    to 0 at ``total_steps``. The factor scales every parameter group's own lr (``lr_mult`` groups included)."""
    if optim.schedule == "linear":
        def linear(step: int) -> float:
            if step < optim.warmup_steps:
                return step / max(1, optim.warmup_steps)
            return max(0.0, (total_steps - step) / max(1, total_steps - optim.warmup_steps))

        return LambdaLR(optimizer, linear)

    def factor(step: int) -> float:
        if step < optim.warmup_steps:
            lr = optim.warmup_lr + (optim.lr - optim.warmup_lr) * step / max(optim.warmup_steps, 1)
        else:
            progress = (step - optim.warmup_steps) / max(total_steps - optim.warmup_steps, 1)
            lr = optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))
        return lr / optim.lr

    return LambdaLR(optimizer, factor)

@dataclass(frozen=True)
class StepPlan:
    """How a run's samples become optimizer steps."""

    micro_batch: int
    accumulation: int
    world_size: int
    steps_per_epoch: int
    schedule_steps: int           # the LR schedule's length: every epoch
    total_steps: int              # where this run stops (``max_steps`` may end it early)

    @property
    def global_batch(self) -> int:
        """Samples in one forward across all ranks (what queues fill by)."""
        return self.micro_batch * self.world_size

    @property
    def samples_per_step(self) -> int:
        return self.micro_batch * self.world_size * self.accumulation


def plan_steps(ds_config: dict, samples_per_epoch: int, world_size: int, optim: OptimConfig,
               max_steps: int | None) -> StepPlan:
    micro_batch = ds_config["train_micro_batch_size_per_gpu"]
    accumulation = ds_config.get("gradient_accumulation_steps", 1)
    steps_per_epoch = samples_per_epoch // (micro_batch * world_size * accumulation)
    if steps_per_epoch < 1:
        raise ConfigError(f"{samples_per_epoch} samples per epoch give no full step of {micro_batch} x {world_size} "
                          f"ranks x {accumulation} accumulation")
    schedule_steps = optim.epochs * steps_per_epoch
    # max_steps stops the run early; the LR schedule stays that of the whole run, so a run stopped and
    # resumed with another max_steps follows the same curve.
    return StepPlan(micro_batch, accumulation, world_size, steps_per_epoch, schedule_steps,
                    min(schedule_steps, max_steps or schedule_steps))


def start_engine(module: torch.nn.Module, parameter_groups: list[dict], ds_config: dict, optim: OptimConfig,
                 plan: StepPlan):
    """``deepspeed.initialize`` with the optimizer's parameter groups and the warm-up + cosine schedule."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=module, model_parameters=parameter_groups, config=ds_config,
        lr_scheduler=lambda optimizer: lr_schedule(optimizer, optim, plan.steps_per_epoch, plan.schedule_steps))
    return engine
