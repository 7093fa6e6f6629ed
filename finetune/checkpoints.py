"""Where fine-tuning weights come from: a pretraining checkpoint, an exported file, or a fine-tuned run.

``open_checkpoint(path)`` accepts
- a DeepSpeed checkpoint directory of a pretraining run at any ZeRO stage (``.../checkpoints`` with
  ``latest``, a ``global_stepN`` directory, or the run directory holding ``checkpoints/``): the shards
  are consolidated to fp32, as ``python -m pretrain.export`` does;
- a single weight file: ``pretrain.export``'s ``.safetensors``, or a released ALBEF ``.pth`` in the
  pretraining or retrieval layout (``ALBEF.pth``, ``mscoco.pth``, ...), ``pretrain_model_nlvr.pth`` for NLVR2
  (its doubled encoder loads as it is) or ``vqa.pth`` for VQA (its own answer decoder);
- a fine-tuning run's checkpoint directory (its ``config.yaml`` names a ``task``): the whole task
  module, for ``--evaluate``.

Backbone states come back in our (= ALBEF's) names with momentum copies and queues split off, and the
image position embeddings interpolated to the fine-tuning resolution. ``load_matching`` puts a state
into a module and fails with one message listing every missing, unexpected and mis-shaped key, apart
from the keys the task says are new (its heads) or unused (e.g. the MLM head for a classifier).
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass

import torch
import yaml
from torch import nn

from pretrain.checkpoint import read_latest
from pretrain.export import albef_state_dict, consolidated_module_state
from pretrain.models import LoadReport, read_state_dict
from pretrain.models.albef import from_albef_state_dict

OBJECTIVE_PREFIX = "objectives."


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says what to do."""


@dataclass(frozen=True)
class Checkpoint:
    kind: str            # "pretrain" | "file" | "finetune"
    path: str            # what the user gave
    directory: str = ""  # DeepSpeed checkpoints folder (kinds pretrain, finetune)
    tag: str = ""
    trusted: bool = False  # open pickles with the full unpickler (--trust-checkpoint)

    def describe(self) -> str:
        return f"{self.path} ({self.kind}{', ' + self.tag if self.tag else ''})"


def _locate_tag(path: str) -> tuple[str, str]:
    path = os.path.normpath(path)
    if os.path.basename(path).startswith("global_step") or os.path.basename(path) == "best":
        return os.path.dirname(path), os.path.basename(path)
    for directory in (path, os.path.join(path, "checkpoints")):
        tag = read_latest(directory)
        if tag is not None:
            return directory, tag
    raise CheckpointError(f"checkpoint {path!r}: no 'latest' file in it or in its checkpoints/ folder; give the "
                          f"checkpoints directory of a run, a global_stepN directory, or a .safetensors/.pth file")


def open_checkpoint(path: str, trusted: bool = False) -> Checkpoint:
    if os.path.isfile(path):
        return Checkpoint("file", path, trusted=trusted)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    directory, tag = _locate_tag(path)
    config_path = os.path.join(directory, tag, "config.yaml")
    kind = "pretrain"
    if os.path.exists(config_path):
        with open(config_path) as handle:
            saved = yaml.safe_load(handle) or {}
        kind = "finetune" if "task" in saved else "pretrain"
    return Checkpoint(kind, path, directory, tag, trusted)


def backbone_state(checkpoint: Checkpoint, num_patches: int | None,
                   keep_objectives: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The online ALBEF weights (momentum copies and queues dropped), ``pos_embed`` resized to ``num_patches``;
    the heads of the pretraining objectives named in ``keep_objectives`` stay (``objectives.<name>.*``), for a task
    that starts from one (X-VLM's box head)."""
    if checkpoint.kind == "finetune":
        raise CheckpointError(f"{checkpoint.path} is a fine-tuned task checkpoint, not a pretraining one")
    try:
        state = (read_state_dict(checkpoint.path, checkpoint.trusted) if checkpoint.kind == "file"
                 else albef_state_dict(checkpoint.directory, checkpoint.tag, checkpoint.trusted))
    except (OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"cannot read checkpoint {checkpoint.describe()}: {error}") from None
    model_state, _momentum, _queues = from_albef_state_dict(state, num_patches=num_patches)
    # Heads of pretraining objectives (objectives.<name>.*) serve pretraining only; tasks bring their own, unless
    # they ask for one by name.
    kept = tuple(f"{OBJECTIVE_PREFIX}{name}." for name in keep_objectives)
    return {name: value for name, value in model_state.items()
            if not name.startswith(OBJECTIVE_PREFIX) or name.startswith(kept)}


def check_concepts(state: dict[str, torch.Tensor], model_reads_concepts: bool, source: str) -> None:
    """A clear error when the checkpoint's model and the configured one disagree on visual concepts (ViCHA)."""
    checkpoint_reads = any(name.startswith("concept_encoder.") for name in state)
    if checkpoint_reads and not model_reads_concepts:
        layers = len({name.split(".")[5] for name in state if name.startswith("concept_encoder.text.bert.encoder.")})
        raise CheckpointError(f"{source}: its model reads visual concepts (a {layers}-layer concept encoder); set "
                              f"model.concepts.layers: {layers} in the config, and give every sample its concepts "
                              "(json.concepts: python -m data_shards concepts, then build)")
    if model_reads_concepts and not checkpoint_reads:
        raise CheckpointError(f"{source}: its model reads no visual concepts, but the config sets "
                              "model.concepts.layers; set it to 0 to fine-tune this checkpoint")


def task_state(checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
    """The whole fine-tuned task module's fp32 state (any ZeRO stage)."""
    if checkpoint.kind != "finetune":
        raise CheckpointError(f"{checkpoint.path} is not a fine-tuning checkpoint")
    try:
        return consolidated_module_state(checkpoint.directory, checkpoint.tag, checkpoint.trusted)
    except (OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"cannot read checkpoint {checkpoint.describe()}: {error}") from None


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def load_matching(module: nn.Module, state: dict[str, torch.Tensor], *, new: tuple[str, ...] = (),
                  unused: tuple[str, ...] = (), source: str = "checkpoint") -> LoadReport:
    """Load ``state`` into ``module``; ``new`` / ``unused`` are glob patterns of module keys allowed to stay
    initialised and of checkpoint keys allowed to be ignored. Anything else that does not fit is an error."""
    own = module.state_dict()
    missing = sorted(name for name in own if name not in state)
    unexpected = sorted(name for name in state if name not in own)
    mis_shaped = sorted(f"{name} {list(state[name].shape)} vs {list(own[name].shape)}"
                        for name in own if name in state and state[name].shape != own[name].shape)
    surprising_missing = [name for name in missing if not _matches(name, new)]
    surprising_unexpected = [name for name in unexpected if not _matches(name, unused)]
    if surprising_missing or surprising_unexpected or mis_shaped:
        lines = [f"{source} does not fit the configured model (check model.* in the config against the "
                 f"checkpoint's config.yaml):"]
        for title, names in (("missing", surprising_missing), ("unexpected", surprising_unexpected),
                             ("shape mismatch (checkpoint vs model)", mis_shaped)):
            if names:
                shown = ", ".join(names[:12]) + (f", ... ({len(names) - 12} more)" if len(names) > 12 else "")
                lines.append(f"  {title} ({len(names)}): {shown}")
        raise CheckpointError("\n".join(lines))
    module.load_state_dict({name: value for name, value in state.items() if name in own}, strict=False)
    return LoadReport(expected_missing=tuple(missing), dropped=tuple(unexpected))
