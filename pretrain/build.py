"""Builders the pretraining entry point uses: the task, the DeepSpeed config, the LR schedule, seeding.

``build_task`` turns a validated :class:`~pretrain.schema.PretrainConfig` into a task module (model +
objectives) and its tokenizer, loading pretrained encoder weights in an explicit step. The task table
``TASKS`` is the one place a new method (X-VLM, ViCHA, ...) is registered.
``ds_config_for`` reads a ``ds_configs/*.json`` file, fills the optimizer's hyperparameters from the
YAML, and makes the few adjustments a CPU-only machine needs, each returned as a note for the log.
"""

from __future__ import annotations

import json
import math
import os
import random

import numpy as np
import torch
from torch.optim.lr_scheduler import LambdaLR

from data_shards.sizes import samples_in  # noqa: F401  (its callers import it from here)
from pretrain.config import ConfigError, resolve_path
from pretrain.models.albef import build_albef, load_pretrained_encoders
from pretrain.schema import OptimConfig, PretrainConfig
from pretrain.tasks.albef import ALBEFPretrainTask
from pretrain.text.tokenizer import build_tokenizer


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_albef_task(config: PretrainConfig, global_batch: int, steps_per_epoch: int):
    model_config, objectives = config.model, config.objectives
    if objectives.queue_size % global_batch:
        raise ConfigError(f"objectives.queue_size={objectives.queue_size} is not divisible by the global batch "
                          f"{global_batch} (micro-batch x world size); pick a multiple, e.g. "
                          f"{max(1, objectives.queue_size // global_batch) * global_batch}")
    bert_dir = resolve_path(model_config.bert_dir)
    if not os.path.isfile(os.path.join(bert_dir, "config.json")):
        raise ConfigError(f"model.bert_dir={model_config.bert_dir!r}: no config.json in {bert_dir}; point it at a "
                          f"local Hugging Face BERT folder")
    model = build_albef(model_config.vision, model_config.image_size, bert_dir, model_config.fusion_layer,
                        embed_dim=model_config.embed_dim, vision_overrides=dict(model_config.vision_overrides),
                        text_overrides=dict(model_config.text_overrides), temp=model_config.temp)
    load_pretrained_encoders(model, vision_weights=resolve_path(model_config.vision_weights),
                             bert_dir=bert_dir if model_config.load_bert_weights else None)
    if model_config.grad_checkpointing:
        model.visual_encoder.set_grad_checkpointing(True)
        model.text_encoder.set_grad_checkpointing(True)
    tokenizer = build_tokenizer(bert_dir, max_length=model_config.max_text_length,
                                trailing_sep=model_config.trailing_sep)
    return ALBEFPretrainTask(model, tokenizer, objectives, steps_per_epoch), tokenizer


# One explicit table: method name -> builder(config, global_batch, steps_per_epoch) -> (task, tokenizer).
TASKS = {"albef": build_albef_task}


def build_task(config: PretrainConfig, global_batch: int, steps_per_epoch: int):
    if config.method not in TASKS:
        raise ConfigError(f"method {config.method!r} is not known; choose one of {', '.join(TASKS)}")
    return TASKS[config.method](config, global_batch, steps_per_epoch)


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
    """Linear warm-up from ``warmup_lr`` to ``lr`` over ``warmup_steps``, then cosine to ``min_lr``."""
    def factor(step: int) -> float:
        if step < optim.warmup_steps:
            lr = optim.warmup_lr + (optim.lr - optim.warmup_lr) * step / max(optim.warmup_steps, 1)
        else:
            progress = (step - optim.warmup_steps) / max(total_steps - optim.warmup_steps, 1)
            lr = optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))
        return lr / optim.lr

    return LambdaLR(optimizer, factor)
