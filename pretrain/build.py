"""Builders shared by pretraining and fine-tuning: the backbone and its tokenizer, the pretraining task, seeding.

``build_backbone`` makes the ALBEF backbone (vision + text towers, projections, ITM head) and its tokenizer
from a ``model`` config section, with no weights loaded: pretraining then loads unimodal weights
(``load_encoder_weights``), fine-tuning a checkpoint. ``build_task`` composes the backbone with the run's
objectives (``pretrain.methods.resolve_objectives``) into the module DeepSpeed trains::

    specs = resolve_objectives(config)
    task, tokenizer = build_task(config, specs, plan)      # plan: pretrain.engine.StepPlan
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from data_shards.sizes import samples_in  # noqa: F401  (its callers import it from here)
from pretrain.config import ConfigError, resolve_path
from pretrain.engine import StepPlan
from pretrain.methods import ObjectiveSpec
from pretrain.models.albef import ALBEFModel, build_albef, load_pretrained_encoders
from pretrain.objectives.base import BuildContext
from pretrain.schema import ModelConfig, PretrainConfig
from pretrain.task import PretrainTask
from pretrain.text.tokenizer import build_tokenizer


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def bert_directory(model_config: ModelConfig) -> str:
    bert_dir = resolve_path(model_config.bert_dir)
    if not os.path.isfile(os.path.join(bert_dir, "config.json")):
        raise ConfigError(f"model.bert_dir={model_config.bert_dir!r}: no config.json in {bert_dir}; point it at a "
                          f"local Hugging Face BERT folder")
    return bert_dir


def build_backbone(model_config: ModelConfig):
    """A randomly initialised backbone and its tokenizer: ``(ALBEFModel, tokenizer)``."""
    bert_dir = bert_directory(model_config)
    model = build_albef(model_config.vision, model_config.image_size, bert_dir, model_config.fusion_layer,
                        embed_dim=model_config.embed_dim, vision_overrides=dict(model_config.vision_overrides),
                        text_overrides=dict(model_config.text_overrides), temp=model_config.temp,
                        concept_layers=model_config.concepts.layers)
    if model_config.grad_checkpointing:
        model.set_grad_checkpointing(True)
    tokenizer = build_tokenizer(bert_dir, max_length=model_config.max_text_length,
                                trailing_sep=model_config.trailing_sep)
    return model, tokenizer


def load_encoder_weights(model: ALBEFModel, model_config: ModelConfig) -> dict:
    """The unimodal pretrained weights a pretraining run starts from (``vision_weights``, the BERT folder's)."""
    return load_pretrained_encoders(model, vision_weights=resolve_path(model_config.vision_weights),
                                    bert_dir=bert_directory(model_config) if model_config.load_bert_weights else None)


def build_task(config: PretrainConfig, specs: list[ObjectiveSpec], plan: StepPlan):
    """The pretraining task (backbone + objectives) and its tokenizer."""
    model, tokenizer = build_backbone(config.model)
    load_encoder_weights(model, config.model)
    build = BuildContext(model=model, tokenizer=tokenizer, global_batch=plan.global_batch,
                         steps_per_epoch=plan.steps_per_epoch, distillation_alpha=config.distillation.alpha)
    objectives = {spec.name: spec.cls(spec.options, build) for spec in specs}
    return PretrainTask(model, objectives, specs, config.distillation, plan.steps_per_epoch, config.method), tokenizer
