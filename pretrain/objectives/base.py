"""The shape every pretraining objective has, and what it is handed at build time and on every step.

An objective is an ``nn.Module`` holding its own heads (its parameters), built from its own options
dataclass (``Config``, strictly validated from the YAML entry ``objectives.<name>``), that declares what it
needs and turns the encoders' outputs into named losses::

    class MyTerm(Objective):
        Config = MyTermConfig                      # options: objectives.my_term.{...} in the YAML
        terms = ("my_term",)                       # the loss names forward returns

        def __init__(self, config: MyTermConfig, build: BuildContext):
            super().__init__(config, build)     # keeps self.config
            self.head = nn.Linear(build.model.text_encoder.hidden_size, 2)

        def needs(self) -> Needs:                  # momentum copies, queues' sizes, intermediate layers
            return Needs(momentum=("visual_encoder",), wants=Wants(image_layers=frozenset({3})))

        def forward(self, encoded, encoded_m, batch, step: StepContext) -> dict[str, torch.Tensor]:
            return {"my_term": ...}

Weights, start steps and the distillation ramp are applied outside, once, by ``pretrain.task.PretrainTask``;
the loss maths lives in plain functions beside each objective, tested on their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from pretrain.models.encoded import TOWERS, Encoded, Wants


@dataclass(frozen=True)
class NoOptions:
    """The options of an objective that has none."""


@dataclass(frozen=True)
class Needs:
    """What an objective asks of the task: EMA copies of some towers, and intermediate encoder states."""

    momentum: tuple[str, ...] = ()      # names out of pretrain.models.encoded.TOWERS
    wants: Wants = Wants()

    def __post_init__(self):
        unknown = sorted(set(self.momentum) - set(TOWERS))
        if unknown:
            raise ValueError(f"momentum copies of {unknown} asked for; the towers are {', '.join(TOWERS)}")


@dataclass(frozen=True)
class BuildContext:
    """What an objective may use when it is built (no disk or network access happens there)."""

    model: nn.Module                     # the backbone (pretrain.models.albef.ALBEFModel)
    tokenizer: object                    # pretrain.text tokenizer: special ids, vocabulary size
    global_batch: int                    # micro-batch x world size (queues fill by whole global batches)
    steps_per_epoch: int                 # optimizer steps
    distillation_alpha: float            # 0: no momentum targets, so no EMA copies are needed for them
    from_checkpoint: bool = False        # the backbone's weights came from model.init_checkpoint


@dataclass
class StepContext:
    """What every objective is handed on each forward, besides the encoded batch."""

    step: int                            # optimizer steps done before this one (the engine's global_steps)
    alpha: float                         # momentum-distillation weight at this step (the ramp, applied once)
    model: nn.Module                     # the backbone: fusion layers and shared heads
    momentum: object | None              # the EMA towers by attribute (visual_encoder, ...), or None
    training: bool
    # Results an objective leaves for the ones after it in the same step (ITC's in-batch similarities, which
    # ITM draws its hard negatives from, exactly as ALBEF does).
    shared: dict = field(default_factory=dict)

    def autocast(self, reference: torch.Tensor):
        """Momentum towers are fp32; run them at the online model's precision (bf16/fp16 engines)."""
        dtype = next(self.model.parameters()).dtype
        return torch.autocast(reference.device.type, dtype=dtype, enabled=dtype != torch.float32)


class Objective(nn.Module):
    """Base of every objective; see the module docstring."""

    Config: ClassVar[type] = NoOptions
    terms: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config, build: BuildContext):
        super().__init__()
        self.config = config

    def needs(self) -> Needs:
        return Needs()

    def forward(self, encoded: Encoded, encoded_m: Encoded | None, batch: dict,
                step: StepContext) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # State kept outside the module tree (queues): placed, saved and restored by the task.
    def place(self, device: torch.device) -> None:
        """Move state kept outside the module tree to ``device``."""

    def extra_state_dict(self) -> dict:
        return {}

    def load_extra_state_dict(self, state: dict) -> None:
        if state:
            raise KeyError(f"{type(self).__name__} keeps no extra state, but the checkpoint has {sorted(state)}")
