"""Checkpoint I/O around DeepSpeed: atomic ``latest``, per-rank client state, pruning, resume lookup.

Layout of ``OUTPUT/checkpoints/``::

    latest                         # the tag of the last COMPLETE checkpoint (written last, atomically)
    global_step500/                # DeepSpeed's files (model/optimizer states, any ZeRO stage)
        client_rank000.pt ...      # per rank: step, epoch, loader position, RNG states
        task_state.pt              # rank 0: momentum encoders, queues, task step (identical on all ranks)
        config.yaml                # the resolved experiment config
        ds_config.json             # the DeepSpeed config the engine ran with

DeepSpeed's own ``latest`` is switched off (``save_latest=False``): ours is written only after every
rank has finished its files, through a temporary name and ``os.replace``, so a crash while saving
leaves ``latest`` on the previous complete checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil

import numpy as np
import torch
import torch.distributed as dist

LATEST = "latest"
TAG_PATTERN = re.compile(r"^global_step(\d+)$")


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def atomic_torch_save(obj, path: str) -> None:
    temporary = f"{path}.tmp{os.getpid()}"
    torch.save(obj, temporary)
    os.replace(temporary, path)


def atomic_write_text(path: str, text: str) -> None:
    temporary = f"{path}.tmp{os.getpid()}"
    with open(temporary, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def rng_states() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(engine, directory: str, step: int, *, client_state: dict, task_state: dict,
                    config_yaml: str, keep: int = 3) -> str:
    """Every rank calls this. Returns the tag written; ``latest`` moves only once all files exist."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    tag = f"global_step{step}"
    engine.save_checkpoint(directory, tag=tag, client_state={"step": step}, save_latest=False)
    tag_dir = os.path.join(directory, tag)
    atomic_torch_save(client_state, os.path.join(tag_dir, f"client_rank{rank:03d}.pt"))
    if rank == 0:
        atomic_torch_save(task_state, os.path.join(tag_dir, "task_state.pt"))
        atomic_write_text(os.path.join(tag_dir, "config.yaml"), config_yaml)
        atomic_write_text(os.path.join(tag_dir, "ds_config.json"), json.dumps(engine.config, indent=2, default=str))
    _barrier()
    if rank == 0:
        atomic_write_text(os.path.join(directory, LATEST), tag)
        prune_checkpoints(directory, keep)
    _barrier()
    return tag


def prune_checkpoints(directory: str, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints (never the one ``latest`` names)."""
    if keep <= 0:
        return
    latest = read_latest(directory)
    tags = sorted((int(match.group(1)), name) for name in os.listdir(directory)
                  if (match := TAG_PATTERN.match(name)) and os.path.isdir(os.path.join(directory, name)))
    for _, name in tags[:-keep]:
        if name != latest:
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def read_latest(directory: str) -> str | None:
    try:
        with open(os.path.join(directory, LATEST)) as handle:
            tag = handle.read().strip()
    except FileNotFoundError:
        return None
    return tag or None


def resolve_resume(resume: str | None, default_directory: str) -> tuple[str, str] | None:
    """``auto`` -> the ``latest`` of the run's own directory (None on a fresh run); ``none`` -> None;
    a checkpoint directory or a ``DIR/global_stepN`` path -> that checkpoint. Returns (directory, tag)."""
    if resume in (None, "none"):
        return None
    if resume == "auto":
        tag = read_latest(default_directory)
        return (default_directory, tag) if tag else None
    path = os.path.normpath(resume)
    if TAG_PATTERN.match(os.path.basename(path)):
        return os.path.dirname(path), os.path.basename(path)
    tag = read_latest(path)
    if tag is None:
        raise FileNotFoundError(f"--resume {resume!r}: no 'latest' file there; pass a checkpoints directory "
                                f"or DIR/global_stepN")
    return path, tag


def load_checkpoint(engine, directory: str, tag: str, *, load_optimizer: bool = True) -> tuple[dict, dict]:
    """Load engine states, then this rank's client state and the shared task state."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    path, _ = engine.load_checkpoint(directory, tag=tag, load_optimizer_states=load_optimizer,
                                     load_lr_scheduler_states=load_optimizer)
    if path is None:
        raise FileNotFoundError(f"DeepSpeed could not load checkpoint {os.path.join(directory, tag)}")
    tag_dir = os.path.join(directory, tag)
    client_file = os.path.join(tag_dir, f"client_rank{rank:03d}.pt")
    client_state = torch.load(client_file, map_location="cpu", weights_only=False) \
        if os.path.exists(client_file) else {}
    task_state = torch.load(os.path.join(tag_dir, "task_state.pt"), map_location="cpu", weights_only=False)
    return client_state, task_state
