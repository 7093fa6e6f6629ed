"""Cross-rank gathers that the contrastive objectives and the feature queues share.

Every function works the same with or without ``torch.distributed``: when no process group is
initialised (a single-process run or a unit test) ``world()`` is ``(0, 1)`` and the gathers return
their input unchanged. Under DeepSpeed the default process group is the one ``deepspeed.init_distributed``
created, so nothing here needs DeepSpeed itself.

Use::

    rank, world_size = world()
    all_text = all_gather_with_grad(text_feat)      # [world_size * B, D]; backward reaches every rank's slice
    with torch.no_grad():
        all_ids = concat_all_gather(ids)             # [world_size * B]; no graph

All ranks must pass tensors of the same shape (ALBEF's rule: drop_last, equal micro batches); a
mismatch raises a ``ValueError`` that lists every rank's size instead of hanging inside the collective.

Tests: ``.venv/bin/python -m pytest -q tests/pretrain/objectives/test_distributed.py`` (two gloo
processes on 127.0.0.1).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group; ``(0, 1)`` when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _check_same_first_dimension(tensor: torch.Tensor, world_size: int) -> None:
    """Raise a clear error when ranks disagree on dim 0 (all_gather would hang or fail deep in gloo/NCCL)."""
    local = torch.tensor([tensor.shape[0]], dtype=torch.long, device=tensor.device)
    sizes = [torch.zeros_like(local) for _ in range(world_size)]
    dist.all_gather(sizes, local)
    sizes_per_rank = [int(size.item()) for size in sizes]
    if len(set(sizes_per_rank)) != 1:
        raise ValueError(
            f"all ranks must gather the same number of rows, got {sizes_per_rank} (rank order); "
            "use drop_last / equal micro batches on every rank"
        )


def _gather_list(tensor: torch.Tensor, world_size: int) -> list[torch.Tensor]:
    tensor = tensor.contiguous()
    _check_same_first_dimension(tensor, world_size)
    gathered = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(gathered, tensor)
    return gathered


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: concatenation of every rank's tensor. Backward: each rank receives the gradient of its
    own slice summed over all ranks' losses.

    Every rank computes its own loss from the same gathered tensor, and DeepSpeed/DDP later average the
    parameter gradients over ranks. The gradient of rank r's input must therefore include how every
    rank's loss depends on rank r's rows: an all-reduce (sum) of the incoming gradient, then rank r's
    slice. Written here rather than using ``torch.distributed.nn.functional.all_gather`` so that the
    backward is one all-reduce that every backend (gloo included) supports.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        rank, world_size = world()
        ctx.rank = rank
        ctx.rows = tensor.shape[0]
        return torch.cat(_gather_list(tensor, world_size), dim=0)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` over ranks along dim 0, in rank order, keeping the autograd graph.

    Identity when not distributed. Every rank must call it (and later call backward) the same number
    of times, as with any collective.
    """
    _, world_size = world()
    if world_size == 1:
        return tensor
    return _AllGatherWithGrad.apply(tensor)


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` over ranks along dim 0, in rank order, without gradient (queues, ids)."""
    _, world_size = world()
    if world_size == 1:
        return tensor.detach()
    return torch.cat(_gather_list(tensor.detach(), world_size), dim=0)
