"""Momentum (EMA) model copies, feature queues and the alpha warm-up: the state ALBEF-family ITC needs.

``MomentumCopy`` holds fp32 EMA copies of online modules, kept OUTSIDE the module tree that
``deepspeed.initialize`` receives: store it as a plain attribute of the task module (it is not an
``nn.Module``), so its parameters are never optimizer parameters, never cast to bf16/fp16 by the
engine and never partitioned by ZeRO-3. Under ZeRO-3 the online parameters are partitioned; ``update``,
``copy_from`` and the constructor rebuild whole weights from every rank's partition (read-only, safe
inside the engine's forward), so the EMA always sees whole weights. They are collectives then: every
rank must call them. NVMe parameter offload is not supported (a clear error says so).

``FeatureQueue`` is ALBEF's ``image_queue``/``text_queue`` (and ``idx_queue`` for retrieval): a (dim, size)
ring buffer of past momentum features from all ranks, also a plain object for the same reasons.

Use (inside a task module's forward, ALBEF order)::

    self.momentum = MomentumCopy({"visual_encoder": vit, "vision_proj": proj, ...}, momentum=0.995)
    self.image_queue = FeatureQueue(256, 65536, generator=torch.Generator().manual_seed(0))
    ...
    self.momentum.update({"visual_encoder": self.visual_encoder, ...})   # start of each training forward
    with torch.no_grad():
        image_feat_m = F.normalize(self.momentum["vision_proj"](self.momentum["visual_encoder"](image)[:, 0]), dim=-1)
    loss = itc_loss(..., self.image_queue.features, ...)
    self.image_queue.enqueue(image_feat_m)                               # after the loss

Momentum forwards run in fp32; wrap them in ``torch.autocast`` to match a bf16/fp16 online model.
Checkpoints: ``state_dict()`` uses ALBEF's names (``visual_encoder_m.*``, ``text_encoder_m.*``).

Tests: ``.venv/bin/python -m pytest -q tests/pretrain/objectives/test_momentum.py``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch import nn

from pretrain.objectives.distributed import concat_all_gather, world

# Gathering a whole model at once under ZeRO-3 would need its full size in bf16 on every rank on top
# of the fp32 EMA copy; gathering in chunks of this many elements bounds that extra memory.
_GATHER_CHUNK_ELEMENTS = 1 << 26


def _is_zero3_partitioned(parameter: torch.Tensor) -> bool:
    return hasattr(parameter, "ds_id")


def _collective_device(group, fallback: torch.device) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return fallback


def _resident_partition(parameter: torch.Tensor) -> torch.Tensor:
    partition = parameter.ds_tensor
    if partition.numel() != partition.ds_numel:
        raise RuntimeError(
            f"the ZeRO-3 partition of parameter {parameter.ds_id} (shape {tuple(parameter.ds_shape)}) is not in "
            "memory: momentum copies do not support NVMe parameter offload (zero_optimization.offload_param.device)"
        )
    return partition.detach().reshape(-1)


@torch.no_grad()
def _whole_values(parameters: list[torch.Tensor]) -> list[torch.Tensor]:
    """The whole value of every parameter; ZeRO-3 partitioned ones are rebuilt from all ranks' partitions.

    Why not ``deepspeed.zero.GatheredParameters``: inside the engine's forward, where ALBEF updates the
    EMA, DeepSpeed has already started prefetching these parameters, and re-partitioning a parameter in
    flight fails. Reading ``ds_tensor`` (each rank's persistent slice of the flattened, padded parameter,
    DeepSpeed's own layout) never touches the parameters' fetch state. One all-gather per dtype and
    process group; every rank must call this with the same parameters in the same order.
    """
    values: list[torch.Tensor | None] = [None] * len(parameters)
    groups: dict[tuple, list[int]] = {}
    for index, parameter in enumerate(parameters):
        if _is_zero3_partitioned(parameter):
            groups.setdefault((parameter.ds_tensor.dtype, id(parameter.ds_process_group)), []).append(index)
        else:
            values[index] = parameter.detach()
    for indices in groups.values():
        group = parameters[indices[0]].ds_process_group
        world_size = dist.get_world_size(group)
        partitions = [_resident_partition(parameters[index]) for index in indices]
        device = _collective_device(group, partitions[0].device)
        local = torch.cat([partition.to(device) for partition in partitions])
        gathered = torch.empty(world_size, local.numel(), dtype=local.dtype, device=device)
        dist.all_gather(list(gathered.unbind(0)), local, group=group)
        offset = 0
        for index, partition in zip(indices, partitions, strict=True):
            parameter = parameters[index]
            flat = gathered[:, offset : offset + partition.numel()].reshape(-1)
            values[index] = flat[: parameter.ds_numel].view(parameter.ds_shape)
            offset += partition.numel()
    return values


def _chunks(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    chunk, elements = [], 0
    for momentum_parameter, online_parameter in pairs:
        chunk.append((momentum_parameter, online_parameter))
        elements += momentum_parameter.numel()
        if elements >= _GATHER_CHUNK_ELEMENTS:
            yield chunk
            chunk, elements = [], 0
    if chunk:
        yield chunk


def _from_deepspeed(hook) -> bool:
    function = getattr(hook, "func", hook)  # functools.partial
    return (getattr(function, "__module__", None) or "").startswith("deepspeed")


def _strip_deepspeed_state(module: nn.Module) -> None:
    """Remove the ZeRO-3 hooks and ``ds_*`` attributes that ``copy.deepcopy`` carries over from a
    partitioned module; left in place they would try to fetch partitions the copy does not have."""
    hook_dicts = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
    for submodule in module.modules():
        for attribute in hook_dicts:
            hooks = getattr(submodule, attribute, None)
            if not hooks:
                continue
            for handle_id in [key for key, hook in hooks.items() if _from_deepspeed(hook)]:
                del hooks[handle_id]
        for attribute in [name for name in vars(submodule) if name.startswith("ds_")]:
            delattr(submodule, attribute)


def _fill_from_partitioned(copied: nn.Module, online: nn.Module) -> None:
    """Give the deep copy of a ZeRO-3 module (whose parameters are empty) fresh Parameters holding the
    whole online values. Fresh Parameters carry none of the methods and handles ZeRO-3 attaches, and
    tied weights (one Parameter in several submodules) stay tied through the memo."""
    online_parameters = list(online.parameters())
    whole = {id(p): value for p, value in zip(online_parameters, _whole_values(online_parameters), strict=True)}
    fresh: dict[int, nn.Parameter] = {}
    for online_submodule, copied_submodule in zip(online.modules(), copied.modules(), strict=True):
        for name, parameter in online_submodule._parameters.items():
            if parameter is None:
                continue
            if id(parameter) not in fresh:
                fresh[id(parameter)] = nn.Parameter(whole[id(parameter)].clone())
            copied_submodule._parameters[name] = fresh[id(parameter)]


class MomentumCopy:
    """fp32 EMA copies of named online modules; not an ``nn.Module`` on purpose (see the module docstring)."""

    def __init__(self, modules: dict[str, nn.Module], momentum: float = 0.995):
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
        self.momentum = momentum
        self.modules: dict[str, nn.Module] = {}
        for name, online in modules.items():
            copied = copy.deepcopy(online)
            if any(_is_zero3_partitioned(parameter) for parameter in online.parameters()):
                _strip_deepspeed_state(copied)
                _fill_from_partitioned(copied, online)
            copied.float()
            copied.requires_grad_(False)
            copied.train(online.training)
            self.modules[name] = copied

    def __getitem__(self, name: str) -> nn.Module:
        return self.modules[name]

    def __contains__(self, name: str) -> bool:
        return name in self.modules

    def names(self) -> list[str]:
        return list(self.modules)

    def towers(self) -> SimpleNamespace:
        """The copies by attribute (``.visual_encoder``, ...), the shape ``pretrain.models.encoded.encode`` reads."""
        return SimpleNamespace(**self.modules)

    def _pairs(self, online: dict[str, nn.Module]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if set(online) != set(self.modules):
            raise KeyError(f"online modules {sorted(online)} do not match momentum copies {sorted(self.modules)}")
        pairs = []
        for name, momentum_module in self.modules.items():
            momentum_named = list(momentum_module.named_parameters())
            online_named = list(online[name].named_parameters())
            if [key for key, _ in momentum_named] != [key for key, _ in online_named]:
                raise KeyError(f"parameters of online module {name!r} differ from its momentum copy")
            pairs.extend((m, o) for (_, m), (_, o) in zip(momentum_named, online_named, strict=True))
        return pairs

    @torch.no_grad()
    def update(self, online: dict[str, nn.Module]) -> None:
        """``p_m = momentum * p_m + (1 - momentum) * p`` for every parameter (buffers untouched, as in ALBEF)."""
        for chunk in _chunks(self._pairs(online)):
            online_values = _whole_values([online_parameter for _, online_parameter in chunk])
            momentum_parameters = [momentum_parameter for momentum_parameter, _ in chunk]
            online_values = [value.to(momentum.device, torch.float32)
                             for momentum, value in zip(momentum_parameters, online_values, strict=True)]
            # Two multi-tensor kernels per chunk instead of two per parameter: the same mul_ then add_ per element.
            torch._foreach_mul_(momentum_parameters, self.momentum)
            torch._foreach_add_(momentum_parameters, online_values, alpha=1.0 - self.momentum)

    @torch.no_grad()
    def copy_from(self, online: dict[str, nn.Module]) -> None:
        """``p_m = p`` (ALBEF ``copy_params``): call after loading weights into the online modules."""
        for chunk in _chunks(self._pairs(online)):
            online_values = _whole_values([online_parameter for _, online_parameter in chunk])
            for (momentum_parameter, _), online_value in zip(chunk, online_values, strict=True):
                momentum_parameter.copy_(online_value)

    def to(self, device: torch.device | str) -> MomentumCopy:
        for module in self.modules.values():
            module.to(device)
        return self

    def train(self, mode: bool = True) -> MomentumCopy:
        """Follow the online model's mode: ALBEF's momentum encoders keep dropout on while training."""
        for module in self.modules.values():
            module.train(mode)
        return self

    def eval(self) -> MomentumCopy:
        return self.train(False)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Parameters and buffers under ALBEF's names: ``<name>_m.<key>``."""
        state = {}
        for name, module in self.modules.items():
            for key, value in module.state_dict().items():
                state[f"{name}_m.{key}"] = value
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Strict: every copy's keys must be present and nothing else; errors name the offending keys."""
        expected = self.state_dict().keys()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise KeyError(f"momentum state mismatch: missing {missing[:10]}, unexpected {unexpected[:10]}")
        for name, module in self.modules.items():
            prefix = f"{name}_m."
            own = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
            module.load_state_dict(own)


class FeatureQueue:
    """Ring buffer of ``size`` feature columns (ALBEF layout ``(dim, size)``), filled from all ranks.

    ``features`` starts as random unit columns (randn normalised over dim 0, as ALBEF); with
    ``with_ids`` an ``ids`` row ``(1, size)`` starts at -100 so random columns never count as positives.
    ``ptr`` is a long tensor of shape [1] (ALBEF ``queue_ptr``).
    """

    def __init__(self, dim: int, size: int, generator: torch.Generator | None = None, with_ids: bool = False):
        if dim <= 0 or size < 0:
            raise ValueError(f"queue dim must be positive and size >= 0, got dim={dim}, size={size}")
        self.features = nn.functional.normalize(torch.randn(dim, size, generator=generator), dim=0)
        self.ids = torch.full((1, size), -100, dtype=torch.long) if with_ids else None
        self.ptr = torch.zeros(1, dtype=torch.long)

    @property
    def size(self) -> int:
        return self.features.shape[1]

    @property
    def dim(self) -> int:
        return self.features.shape[0]

    @torch.no_grad()
    def enqueue(self, features: torch.Tensor, ids: torch.Tensor | None = None) -> None:
        """Write every rank's ``features`` [B, dim] (and ``ids`` [B]) at ``ptr``, in rank order; a collective."""
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise ValueError(f"queue features must be [batch, {self.dim}], got {list(features.shape)}")
        if (ids is None) != (self.ids is None):
            raise ValueError("pass ids exactly when the queue was built with with_ids=True")
        if self.size == 0:
            return  # size 0: in-batch negatives only
        _, world_size = world()
        micro_batch = features.shape[0]
        global_batch = micro_batch * world_size
        if self.size % global_batch != 0:
            raise ValueError(
                f"queue_size {self.size} must be a multiple of the global batch {global_batch} "
                f"(world size {world_size} x micro batch {micro_batch}); change queue_size or the batch size"
            )
        gathered = concat_all_gather(features)
        # The write position stays on the device: reading ``ptr`` back would make every step wait for the GPU.
        # The columns are those of ALBEF's slice ``[ptr, ptr + global_batch)`` (size is a multiple of it).
        columns = self.ptr.to(self.features.device) + torch.arange(global_batch, device=self.features.device)
        self.features.index_copy_(1, columns, gathered.T.to(self.features.device, self.features.dtype))
        if self.ids is not None:
            gathered_ids = concat_all_gather(ids.reshape(-1).to(features.device))
            self.ids.index_copy_(1, columns.to(self.ids.device), gathered_ids.to(self.ids.device).reshape(1, -1))
        self.ptr.add_(global_batch).remainder_(self.size)

    def to(self, device: torch.device | str) -> FeatureQueue:
        self.features = self.features.to(device)
        self.ptr = self.ptr.to(device)
        if self.ids is not None:
            self.ids = self.ids.to(device)
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"features": self.features, "ptr": self.ptr}
        if self.ids is not None:
            state["ids"] = self.ids
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if tuple(state["features"].shape) != tuple(self.features.shape):
            raise ValueError(f"queue shape {list(state['features'].shape)} != expected {list(self.features.shape)}")
        if ("ids" in state) != (self.ids is not None):
            raise KeyError("queue ids present in only one of the state and the queue")
        self.features.copy_(state["features"])
        self.ptr.copy_(state["ptr"].reshape(1))
        if self.ids is not None:
            self.ids.copy_(state["ids"].reshape(1, -1))


def alpha_at(alpha: float, step: int, steps_per_epoch: int, warmup: bool = True) -> float:
    """Distillation weight at global 0-based optimizer step ``step``: ``alpha * min(1, step / steps_per_epoch)``.

    ALBEF ramps alpha linearly over the first epoch (``alpha * min(1, i / len(loader))`` in epoch 0 and
    ``alpha`` after); with ``step`` counted from the start of training this is the same value in every
    epoch, and it needs no epoch counter (streamed shards have none). ``warmup=False`` (SNLI-VE) gives
    the constant ``alpha``; to ramp over two epochs as LAVIS does, pass ``2 * steps_per_epoch``.
    """
    if not warmup:
        return alpha
    if steps_per_epoch <= 0:
        raise ValueError(f"steps_per_epoch must be positive for the alpha warm-up, got {steps_per_epoch}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return alpha * min(1.0, step / steps_per_epoch)
