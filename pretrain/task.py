"""The pretraining task: the backbone plus the listed objectives behind one ``forward(batch) -> {name: loss}``.

This is the module ``deepspeed.initialize`` receives. One forward encodes the batch once with both towers
(``pretrain.models.encoded``), once more with the momentum (EMA) copies when an objective asks for them,
then runs every objective that is on at this step and sums their terms, each weighted by its objective's
``weight``::

    task = PretrainTask(model, objectives, specs, DistillationConfig(), steps_per_epoch=1000, method="albef")
    task.set_step(engine.global_steps)     # start steps and the alpha ramp count optimizer steps
    losses = task(batch)                   # {"loss": sum, "itc": ..., "itm": ..., "mlm": ...}

The loop talks to it through a small protocol and knows nothing of any method: ``set_step``,
``place(device)`` (state kept outside the module tree), ``extra_state_dict`` / ``load_extra_state_dict``
(that state in checkpoints, with the method and objectives that produced it), ``log_values`` (alpha,
temperature) and ``parameter_groups``.

The momentum copies exist only when a listed objective asks for them: the union of what every objective's
``needs()`` names. They live outside the module tree (see ``pretrain.objectives.momentum.MomentumCopy``):
never optimizer parameters, never partitioned by ZeRO-3, fp32 under bf16/fp16 engines.
"""

from __future__ import annotations

import torch
from torch import nn

from pretrain.methods import ObjectiveSpec
from pretrain.models.encoded import Encoded, Wants, concept_inputs, encode, momentum_towers
from pretrain.objectives.base import Objective, StepContext
from pretrain.objectives.momentum import MomentumCopy, alpha_at
from pretrain.schema import DistillationConfig, OptimConfig


class PretrainTask(nn.Module):
    def __init__(self, model: nn.Module, objectives: dict[str, Objective], specs: list[ObjectiveSpec],
                 distillation: DistillationConfig, steps_per_epoch: int, method: str,
                 optim: OptimConfig | None = None, new_parameters: frozenset[str] = frozenset()):
        super().__init__()
        # What parameter_groups needs: the decay rule, and X-VLM's larger lr (lr x lr_mult) for the parameters
        # that start untrained (names as this module has them: model.*, objectives.*).
        self.optim = optim or OptimConfig()
        self.new_parameters = new_parameters
        self.model = model
        self.objectives = nn.ModuleDict(objectives)
        self.specs = {spec.name: spec for spec in specs}
        self.distillation = distillation
        self.steps_per_epoch = max(steps_per_epoch, 1)
        self.method = method
        needs = [objective.needs() for objective in objectives.values()]
        self.wants = Wants()
        for need in needs:
            self.wants = self.wants | need.wants
        asked = {name for need in needs for name in need.momentum}
        self.momentum_towers = momentum_towers(asked, model)
        momentum = None
        if self.momentum_towers:
            momentum = MomentumCopy({name: getattr(model, name) for name in self.momentum_towers},
                                    momentum=distillation.momentum)
        # Kept out of nn.Module registration on purpose (see the module docstring).
        self.__dict__["momentum"] = momentum
        self.step = 0
        self._alpha = 0.0
        self._momentum_updated_at: int | None = None

    # -- the protocol the loop uses ---------------------------------------------------------------
    def set_step(self, step: int) -> None:
        """Optimizer steps done so far (the engine's ``global_steps``): start steps and the ramp read it."""
        self.step = step

    def place(self, device: torch.device) -> None:
        if self.momentum is not None:
            self.momentum.to(device)
        for objective in self.objectives.values():
            objective.place(device)

    def extra_state_dict(self) -> dict:
        return {"method": self.method,
                "objectives": {name: {"class": f"{type(objective).__module__}:{type(objective).__qualname__}",
                                      "weight": self.specs[name].weight, "start_step": self.specs[name].start_step}
                               for name, objective in self.objectives.items()},
                "objective_state": {name: objective.extra_state_dict()
                                    for name, objective in self.objectives.items()},
                "momentum": self.momentum.state_dict() if self.momentum is not None else {}}

    def load_extra_state_dict(self, state: dict) -> None:
        state = upgrade_task_state(state)
        saved, ours = set(state.get("objective_state", {})), set(self.objectives)
        if saved != ours:
            raise KeyError(f"the checkpoint was trained with objectives {sorted(saved)}, this run lists "
                           f"{sorted(ours)}; resume with the same objectives (or start a new run from its weights)")
        for name, objective in self.objectives.items():
            objective.load_extra_state_dict(state["objective_state"][name])
        if (self.momentum is None) != (not state.get("momentum")):
            raise KeyError("the checkpoint and this run disagree on momentum copies: "
                           f"checkpoint {'has' if state.get('momentum') else 'has none'}, "
                           f"this run's objectives ask for {list(self.momentum_towers) or 'none'}")
        if self.momentum is not None:
            self.momentum.load_state_dict(state["momentum"])

    def log_values(self) -> dict:
        values = {"alpha": self._alpha}
        temp = getattr(self.model, "temp", None)
        if temp is not None:
            values["temp"] = temp.item()
        return values

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        new_lr = self.optim.lr * self.optim.lr_mult if self.optim.lr_mult != 1 else None
        return parameter_groups(self, weight_decay, rule=self.optim.no_decay, new=self.new_parameters, new_lr=new_lr)

    # -- the step ---------------------------------------------------------------------------------
    def current_alpha(self) -> float:
        return alpha_at(self.distillation.alpha, self.step, self.steps_per_epoch, self.distillation.alpha_warmup)

    def forward(self, batch: dict) -> dict:
        step = self.step
        active = [name for name, spec in self.specs.items() if spec.weight and step >= spec.start_step]
        self._alpha = alpha = self.current_alpha()
        encoded = encode(self.model, batch["image"], batch["input_ids"], batch["attention_mask"], self.wants,
                         concept_inputs(batch))
        encoded_m = self._encode_momentum(batch, step)
        context = StepContext(step=step, alpha=alpha, model=self.model, training=self.training,
                              momentum=self.momentum.towers() if self.momentum is not None else None)
        losses, weights = {}, {}
        for name in active:
            for term, value in self.objectives[name](encoded, encoded_m, batch, context).items():
                if term in losses or term == "loss":
                    raise ValueError(f"objective {name!r} returns term {term!r}, which another term already uses")
                losses[term], weights[term] = value, self.specs[name].weight
        losses["loss"] = sum(weights[term] * value for term, value in losses.items())
        return losses

    def _encode_momentum(self, batch: dict, step: int) -> Encoded | None:
        if self.momentum is None:
            return None
        with torch.no_grad():
            if self.training and self._momentum_updated_at != step:  # once per optimizer step
                self.momentum.update({name: getattr(self.model, name) for name in self.momentum_towers})
                self._momentum_updated_at = step
            # fp32 copies run at the engine's precision: an fp32 ViT-B forward would cost more than the whole
            # bf16 online step on a GPU. Under an outer autocast (fp32 weights trained in bf16) it keeps that one.
            dtype = next(self.model.parameters()).dtype
            images = batch["image"]
            enabled = dtype != torch.float32 or torch.is_autocast_enabled(images.device.type)
            if torch.is_autocast_enabled(images.device.type):
                dtype = torch.get_autocast_dtype(images.device.type)
            with torch.autocast(images.device.type, dtype=dtype, enabled=enabled):
                return encode(self.momentum.towers(), images.float(), batch["input_ids"], batch["attention_mask"],
                              self.wants, concept_inputs(batch))


# X-VLM's rule: a parameter skips weight decay when its name holds one of these (``relative_position_bias_table``
# included, through "bias"); ``norm_pre.`` is timm's name for the CLIP ViT's pre-LayerNorm (X-VLM's pre_layrnorm).
XVLM_NO_DECAY = ("bias", "LayerNorm.bias", "LayerNorm.weight", "norm.bias", "norm.weight", "norm1.bias",
                 "norm1.weight", "norm2.bias", "norm2.weight", "norm_pre.")


def _exempt(name: str, parameter: nn.Parameter, rule: str) -> bool:
    if rule == "xvlm":
        return any(part in name for part in XVLM_NO_DECAY)
    return (parameter.ndim == 1 and not name.endswith("temp")) or name.endswith(".bias")


def parameter_groups(module: nn.Module, weight_decay: float, rule: str = "albef", new: frozenset[str] = frozenset(),
                     new_lr: float | None = None) -> list[dict]:
    """Optimizer groups by weight decay and, with ``new_lr``, by learning rate.

    ``rule`` ``albef``: 1-D tensors and biases get no weight decay; all else does, ``temp`` included (0-d in
    ALBEF, so decayed there; ours has shape [1] and is named explicitly). ``xvlm``: X-VLM's name rule
    (``XVLM_NO_DECAY``). With ``new_lr``, the parameters named in ``new`` form two more groups at that lr
    (X-VLM's ``lr_mult``); empty groups are left out.
    """
    groups = {(False, False): [], (True, False): [], (False, True): [], (True, True): []}
    for name, parameter in module.named_parameters():
        if not parameter.requires_grad:
            continue
        groups[(_exempt(name, parameter, rule), new_lr is not None and name in new)].append(parameter)
    result = [{"params": groups[(False, False)], "weight_decay": weight_decay},
              {"params": groups[(True, False)], "weight_decay": 0.0}]
    if new_lr is not None:
        result += [{"params": params, "weight_decay": weight_decay if not exempt else 0.0, "lr": new_lr}
                   for (exempt, is_new), params in groups.items() if is_new and params]
    return result


def upgrade_task_state(state: dict) -> dict:
    """A task state in today's layout; checkpoints of the ALBEF-only task (momentum, both queues and a step at
    the top level) are read as that task's objectives: itc with the queues, itm and mlm without state."""
    if "objective_state" in state:
        return state
    return {"method": "albef", "momentum": state.get("momentum", {}),
            "objective_state": {"itc": {"image_queue": state["image_queue"], "text_queue": state["text_queue"]},
                                "itm": {}, "mlm": {}}}
