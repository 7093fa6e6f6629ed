"""Process-level helpers the pretraining and fine-tuning entry points share.

``to_device`` moves a batch (nested dicts of tensors and lists) to the engine's device; ``cpu_thread_notes``
gives ranks sharing one CPU machine an equal share of its cores; ``is_first_rank`` says which process
prints; ``release_shared_memory`` removes the all-reduce buffer DeepSpeed's CPU backend leaves in /dev/shm;
``compile_blocks`` compiles the transformer blocks of the towers (``model.compile: true``).
"""

from __future__ import annotations

import contextlib
import glob
import os

import torch


def to_device(batch: dict, device: torch.device) -> dict:
    """Tensors of ``batch`` (and of dicts nested in it, e.g. extra streams' batches) on ``device``."""
    moved = {}
    for key, value in batch.items():
        if torch.is_tensor(value):
            moved[key] = value.to(device, non_blocking=True)
        elif isinstance(value, dict):
            moved[key] = to_device(value, device)
        else:
            moved[key] = value
    return moved


def cpu_thread_notes() -> list[str]:
    """Ranks sharing one CPU machine each get an equal share of its cores (unless OMP_NUM_THREADS says)."""
    if torch.cuda.is_available() or "OMP_NUM_THREADS" in os.environ:
        return []
    local_ranks = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", 1)))
    threads = max(1, (os.cpu_count() or 1) // max(local_ranks, 1))
    torch.set_num_threads(threads)
    return [f"CPU run: {threads} torch thread(s) per rank for {local_ranks} local rank(s)"]


def is_first_rank() -> bool:
    """Rank 0 of the launch (from the launcher's ``RANK``; true for a plain single process), before or after
    ``torch.distributed`` is set up."""
    return int(os.environ.get("RANK", "0")) == 0


def release_shared_memory() -> None:
    """Unlink this rank's CPU all-reduce buffer (``/dev/shm/deepspeed_allreduce_buffer_*_ADDR_PORT_RANK``).

    DeepSpeed's CPU communication backend never removes it, so every CPU run would leave 66 MB per rank in
    /dev/shm. The mapping stays valid until the process exits; only the name goes."""
    address, port, rank = (os.environ.get(name) for name in ("MASTER_ADDR", "MASTER_PORT", "RANK"))
    if torch.cuda.is_available() or None in (address, port, rank):
        return
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{address}_{port}_{rank}"):
        with contextlib.suppress(OSError):
            os.unlink(path)


def compile_blocks(*roots: torch.nn.Module, backend: str = "inductor") -> int:
    """``torch.compile`` every transformer block (timm ``Block``, Hugging Face ``BertLayer`` and its fusion
    subclass) under ``roots``, in place; returns how many.

    Per block rather than whole towers: the blocks are where the FLOPs are, each compiles once and is
    reused by every layer of its shape, and the code between them (masks, the momentum side, queues,
    losses) stays eager, so names, state dicts and checkpoints do not change (``nn.Module.compile``)."""
    from timm.models.vision_transformer import Block
    from transformers.models.bert.modeling_bert import BertLayer

    compiled = 0
    for root in roots:
        for module in root.modules():
            if isinstance(module, (Block, BertLayer)):
                module.compile(backend=backend)
                compiled += 1
    return compiled
