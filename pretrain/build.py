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
from dataclasses import dataclass

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
                        itm_head=model_config.itm_head, local_attn_depth=model_config.local_attn_depth,
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


# Backbone parts that never come from unimodal weights: new in every pretraining run.
HEADS = ("vision_proj.", "text_proj.", "itm_head.", "temp")


def new_parameter_names(model: ALBEFModel, reports: dict) -> frozenset[str]:
    """Backbone parameters (``model.*``) a pretraining run starts untrained: the heads, the projections, the
    temperature, and whatever the unimodal weights did not fill (cross-attention, a head the BERT file lacks, a
    whole tower given no weights). X-VLM trains these at ``lr x lr_mult``."""
    names = set()
    for prefix, report in (("visual_encoder.", reports.get("vision")), ("text_encoder.", reports.get("text"))):
        tower = {name for name, _ in model.named_parameters() if name.startswith(prefix)}
        names |= tower if report is None else tower & {prefix + key for key in
                                                       (*report.missing, *report.expected_missing)}
    names |= {name for name, _ in model.named_parameters() if name.startswith(HEADS)}
    return frozenset("model." + name for name in names)


def read_init_checkpoint(path: str) -> dict:
    """The weights of a whole pretrained model in the exported layout: a ``.safetensors`` (``pretrain.export``, an
    imported X-VLM file) or a pretraining run's checkpoints directory (consolidated at any ZeRO stage)."""
    from pretrain.checkpoint import read_latest
    from pretrain.export import albef_state_dict
    from pretrain.models import read_state_dict

    if os.path.isfile(path):
        return read_state_dict(path)
    directory = os.path.normpath(path)
    tag = read_latest(directory)
    if tag is None and os.path.basename(directory).startswith("global_step"):
        directory, tag = os.path.dirname(directory), os.path.basename(directory)
    if tag is None:
        raise ConfigError(f"model.init_checkpoint={path!r}: neither a weight file nor a checkpoints directory with "
                          "a 'latest' file")
    return albef_state_dict(directory, tag)


@dataclass(frozen=True)
class InitialWeights:
    """What ``model.init_checkpoint`` gave: the task's parameter names it did not fill (they start untrained) and
    the momentum copies it held (keyed by the online names; empty for files without them)."""

    untrained: frozenset[str]
    momentum: dict


def load_init_checkpoint(model: ALBEFModel, objectives: dict, path: str) -> InitialWeights:
    """Load a whole pretrained model (``model.init_checkpoint``) into the backbone and the objectives' heads
    (``objectives.<name>.*``): an exported ``.safetensors`` (ours, an imported X-VLM file), a run's checkpoints
    directory, or a released ALBEF/PEVL ``.pth`` (PEVL's never-written id queues and the position-ids buffer are
    left out; its momentum copies are returned for the task's momentum towers; queues are not carried over).
    A key that fits nowhere, a shape that differs, or a backbone key the file lacks is an error."""
    from pretrain.importers.pevl import UNUSED_QUEUES
    from pretrain.models.albef import from_albef_state_dict
    from pretrain.models.swin import fit_vision_state

    try:
        state = read_init_checkpoint(path)
    except (OSError, ValueError) as error:
        raise ConfigError(f"model.init_checkpoint={path!r}: {error}") from None
    if isinstance(state.get("model"), dict):
        state = state["model"]
    state = {key: value for key, value in state.items() if key not in UNUSED_QUEUES}
    model_state, momentum, _queues = from_albef_state_dict(state, num_patches=model.visual_encoder.num_patches)
    model_state = fit_vision_state(model.visual_encoder, model_state)
    targets = {**{f"model.{name}": tensor for name, tensor in model.state_dict().items()},
               **{f"objectives.{name}.{key}": tensor for name, objective in objectives.items()
                  for key, tensor in objective.state_dict().items()}}
    state = {(name if name.startswith("objectives.") else f"model.{name}"): value
             for name, value in model_state.items()}
    unplaced = sorted(name for name in state if name not in targets and not name.startswith("objectives."))
    # The backbone comes whole from the file; only objective heads it lacks may start untrained.
    missing = sorted(name for name in targets if name.startswith("model.") and name not in state)
    mis_shaped = sorted(f"{name} {list(state[name].shape)} vs {list(targets[name].shape)}" for name in state
                        if name in targets and state[name].shape != targets[name].shape)
    if unplaced or mis_shaped or missing:
        raise ConfigError(f"model.init_checkpoint={path!r} does not fit the configured model:\n  unexpected: "
                          f"{unplaced[:12]}\n  shape mismatch: {mis_shaped[:12]}"
                          + (f"\n  missing: {missing[:12]}" if missing else ""))
    model.load_state_dict({name[len("model."):]: value for name, value in state.items() if name.startswith("model.")},
                          strict=False)
    for name, objective in objectives.items():
        prefix = f"objectives.{name}."
        own = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
        if own:
            objective.load_state_dict(own, strict=False)
    return InitialWeights(frozenset(name for name in targets if name not in state), momentum)


def build_task(config: PretrainConfig, specs: list[ObjectiveSpec], plan: StepPlan):
    """The pretraining task (backbone + objectives) and its tokenizer."""
    model, tokenizer = build_backbone(config.model)
    reports = load_encoder_weights(model, config.model)
    build = BuildContext(model=model, tokenizer=tokenizer, global_batch=plan.global_batch,
                         steps_per_epoch=plan.steps_per_epoch, distillation_alpha=config.distillation.alpha,
                         from_checkpoint=bool(config.model.init_checkpoint))
    objectives = {spec.name: spec.cls(spec.options, build) for spec in specs}
    initial = None
    if config.model.init_checkpoint:
        initial = load_init_checkpoint(model, objectives, resolve_path(config.model.init_checkpoint))
        new = initial.untrained
    else:
        heads = {f"objectives.{name}.{parameter}" for name, objective in objectives.items()
                 for parameter, _ in objective.named_parameters()}
        new = new_parameter_names(model, reports) | heads
    task = PretrainTask(model, objectives, specs, config.distillation, plan.steps_per_epoch, config.method,
                        optim=config.optim, new_parameters=new)
    if initial is not None and initial.momentum and task.momentum is not None:
        task.momentum.load_state_dict({f"{name.split('.', 1)[0]}_m.{name.split('.', 1)[1]}": value
                                       for name, value in initial.momentum.items()
                                       if name.split(".", 1)[0] in task.momentum_towers})
    return task, tokenizer
