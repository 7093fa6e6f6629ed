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
                        text_overrides=dict(model_config.text_overrides), temp=model_config.temp)
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
    initial = load_init_checkpoint(model, config.model) if config.model.init_checkpoint else None
    build = BuildContext(model=model, tokenizer=tokenizer, global_batch=plan.global_batch,
                         steps_per_epoch=plan.steps_per_epoch, distillation_alpha=config.distillation.alpha,
                         from_checkpoint=initial is not None)
    objectives = {spec.name: spec.cls(spec.options, build) for spec in specs}
    task = PretrainTask(model, objectives, specs, config.distillation, plan.steps_per_epoch, config.method)
    if initial is not None and initial.momentum and task.momentum is not None:
        task.momentum.load_state_dict({f"{name.split('.', 1)[0]}_m.{name.split('.', 1)[1]}": value
                                       for name, value in initial.momentum.items()
                                       if name.split(".", 1)[0] in task.momentum_towers})
    return task, tokenizer


def load_init_checkpoint(model: ALBEFModel, model_config: ModelConfig):
    """``model.init_checkpoint`` into the backbone, strictly (every key of the file accounted for: see
    ``pretrain.importers.pevl``, whose layout holds ALBEF's); returns the imported parts."""
    from pretrain.importers.pevl import import_pevl_state
    from pretrain.models import read_state_dict

    path = resolve_path(model_config.init_checkpoint)
    try:
        imported = import_pevl_state(read_state_dict(path), num_patches=model.visual_encoder.num_patches)
    except (OSError, ValueError) as error:
        raise ConfigError(f"model.init_checkpoint={model_config.init_checkpoint!r}: {error}") from None
    own = model.state_dict()
    missing = sorted(set(own) - set(imported.model))
    unexpected = sorted(set(imported.model) - set(own))
    mis_shaped = sorted(key for key in set(own) & set(imported.model) if own[key].shape != imported.model[key].shape)
    if missing or unexpected or mis_shaped:
        raise ConfigError(f"model.init_checkpoint={model_config.init_checkpoint!r} does not fit model.*: missing "
                          f"{missing[:6]}, unexpected {unexpected[:6]}, mis-shaped {mis_shaped[:6]}")
    model.load_state_dict(imported.model)
    return imported
