"""Checkpoint I/O around DeepSpeed: atomic ``latest``, per-rank client state, pruning, resume lookup.

Layout of ``OUTPUT/checkpoints/``::

    latest                         # the tag of the last COMPLETE checkpoint (written last, atomically)
    global_step500/                # DeepSpeed's files (model/optimizer states, any ZeRO stage)
        client_rank000.pt ...      # per rank: step, epoch, loader position, RNG states
        task_state.pt              # rank 0: method, objectives and their state (queues), momentum copies
        config.yaml                # the resolved experiment config
        ds_config.json             # the DeepSpeed config the engine ran with
        universal/                 # only after a resume on another world size (see below)

DeepSpeed's own ``latest`` is switched off (``save_latest=False``): ours is written only after every
rank has finished its files, through a temporary name and ``os.replace``, so a crash while saving
leaves ``latest`` on the previous complete checkpoint.

Resuming on a different number of ranks: ZeRO (stages 1-3) splits the optimizer state by rank, and
DeepSpeed refuses to load it into another world size. ``prepare_world_size_change`` (called before
``deepspeed.initialize``) has rank 0 convert such a checkpoint once into DeepSpeed's universal format
(``TAG/universal``: every parameter's fp32 weights and Adam moments whole) and switches on
``checkpoint.load_universal``, so each new rank loads its own slice. Stage 0 keeps the optimizer state
whole in ``mp_rank_00_model_states.pt``, which loads at any world size as it is.
"""

from __future__ import annotations

import glob
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import torch
import torch.distributed as dist

from pretrain.safe_loading import load_file, restricted_unpickling

LATEST = "latest"
UNIVERSAL = "universal"
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


class OutputNotWritable(OSError):
    """The run's output folder cannot be written (read-only file system, no permission)."""


def check_writable(directory: str, option: str = "--output-dir") -> None:
    """Fail before any work when ``directory`` cannot hold the run's files; the message says which option moves it."""
    try:
        os.makedirs(directory, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=directory, prefix=".write-check-")  # noqa: SIM115
        probe.close()
    except OSError as error:
        reason = error.strerror or str(error)
        raise OutputNotWritable(f"cannot write to {directory} ({reason}); choose a writable folder with "
                                f"{option}") from None


def tag_step(tag: str) -> int | None:
    """N of ``global_stepN`` (None for other tags such as ``best``)."""
    match = TAG_PATTERN.match(os.path.basename(tag.split("/")[0]))
    return int(match.group(1)) if match else None


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


class ResumeError(ValueError):
    """A ``--resume`` target that is not a complete checkpoint; the message names it and what exists."""


def resolve_resume(resume: str | None, default_directory: str) -> tuple[str, str] | None:
    """``auto`` -> the ``latest`` of the run's own directory (None on a fresh run); ``none`` -> None;
    a checkpoint directory or a ``DIR/global_stepN`` path -> that checkpoint. Returns (directory, tag),
    checked to be a complete checkpoint before anything is built."""
    if resume in (None, "none"):
        return None
    if resume == "auto":
        tag = read_latest(default_directory)
        if tag is None:
            return None
        directory = default_directory
    else:
        path = os.path.normpath(resume)
        if TAG_PATTERN.match(os.path.basename(path)):
            directory, tag = os.path.dirname(path), os.path.basename(path)
        else:
            directory, tag = path, read_latest(path)
            if tag is None:
                raise ResumeError(f"--resume {resume}: no 'latest' file there; pass a run's checkpoints directory "
                                  f"or DIR/global_stepN{_available_tags(path)}")
    check_complete(directory, tag, what=f"--resume {resume}")
    return directory, tag


def _available_tags(directory: str) -> str:
    tags = sorted((int(match.group(1)), name) for name in (os.listdir(directory) if os.path.isdir(directory) else ())
                  if (match := TAG_PATTERN.match(name)))
    return f" (checkpoints there: {', '.join(name for _, name in tags)})" if tags else ""


def check_complete(directory: str, tag: str, what: str) -> None:
    """A tag directory that DeepSpeed and this loop can load: model states, client and task state present."""
    tag_dir = os.path.join(directory, tag)
    if not os.path.isdir(tag_dir):
        raise ResumeError(f"{what}: {tag_dir} does not exist{_available_tags(directory)}")
    needed = {"model states (*model_states.pt)": glob.glob(os.path.join(tag_dir, "*model_states.pt")),
              "task_state.pt": glob.glob(os.path.join(tag_dir, "task_state.pt")),
              "client_rank000.pt": glob.glob(os.path.join(tag_dir, "client_rank000.pt"))}
    missing = [name for name, found in needed.items() if not found]
    if missing:
        raise ResumeError(f"{what}: {tag_dir} is not a complete checkpoint of this project (missing "
                          f"{', '.join(missing)}){_available_tags(directory)}")


def saved_world_size(directory: str, tag: str) -> int:
    """How many ranks wrote the checkpoint (each writes its own client_rankNNN.pt)."""
    return len(glob.glob(os.path.join(directory, tag, "client_rank*.pt")))


def read_client_state(directory: str, tag: str, rank: int, trusted: bool = False) -> dict:
    client_file = os.path.join(directory, tag, f"client_rank{rank:03d}.pt")
    if not os.path.exists(client_file):
        return {}
    return load_file(client_file, trusted=trusted)


def convert_to_universal(tag_dir: str, trusted: bool = False) -> str:
    """``TAG/universal`` from a ZeRO checkpoint with DeepSpeed's ds_to_universal (once; atomic rename)."""
    output = os.path.join(tag_dir, UNIVERSAL)
    if os.path.isdir(output):
        return output
    partial = f"{output}.partial{os.getpid()}"
    arguments = ["--input_folder", tag_dir, "--output_folder", partial, "--inject_missing_state",
                 "--num_extract_workers", str(min(4, os.cpu_count() or 1)), "--num_merge_workers", "1"]
    # DeepSpeed's converter unpickles every file of the checkpoint: it runs under the same allowlist.
    runner = ["-m"] if trusted else ["-m", "pretrain.safe_loading"]
    command = [sys.executable, *runner, "deepspeed.checkpoint.ds_to_universal", *arguments]
    result = subprocess.run(command, capture_output=True, text=True)
    stray = os.path.join(tag_dir, "latest_universal")  # the converter's own pointer; ours is the folder name
    if os.path.exists(stray):
        os.remove(stray)
    if result.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        raise RuntimeError(f"converting {tag_dir} to a universal checkpoint failed:\n{result.stderr[-3000:]}")
    os.replace(partial, output)
    return output


def prepare_world_size_change(directory: str, tag: str, world_size: int, ds_config: dict,
                              trusted: bool = False) -> str:
    """Every rank, before ``deepspeed.initialize``: the tag for ``engine.load_checkpoint``.

    The checkpoint's own tag when its world size is this one (or its optimizer state is whole);
    otherwise ``TAG/universal``, converted by rank 0, with ``ds_config`` set to load it.
    """
    tag_dir = os.path.join(directory, tag)
    partitioned = glob.glob(os.path.join(tag_dir, "*zero_pp_rank_*_optim_states.pt"))
    if saved_world_size(directory, tag) in (0, world_size) or not partitioned:
        return tag
    rank = dist.get_rank() if dist.is_initialized() else 0
    failure = None
    if rank == 0:
        try:
            convert_to_universal(tag_dir, trusted)
        except RuntimeError as error:
            failure = error
    _barrier()
    if failure is not None:
        raise failure
    if not os.path.isdir(os.path.join(tag_dir, UNIVERSAL)):
        raise RuntimeError(f"no universal checkpoint in {tag_dir} after rank 0 converted it; see rank 0's error")
    ds_config.setdefault("checkpoint", {})["load_universal"] = True
    return os.path.join(tag, UNIVERSAL)


def load_checkpoint(engine, directory: str, tag: str, *, load_optimizer: bool = True,
                    engine_tag: str | None = None, trusted: bool = False) -> tuple[dict, dict]:
    """Load engine states (from ``engine_tag`` when given, e.g. ``TAG/universal``), then this rank's
    client state (empty for a rank the checkpoint did not have) and the shared task state, every file
    through the restricted unpickler unless ``trusted``."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    tag_dir = os.path.join(directory, tag)
    with restricted_unpickling(trusted=trusted, where=tag_dir):
        path, _ = engine.load_checkpoint(directory, tag=engine_tag or tag, load_optimizer_states=load_optimizer,
                                         load_lr_scheduler_states=load_optimizer)
    if path is None:
        raise FileNotFoundError(f"DeepSpeed could not load checkpoint {tag_dir}")
    client_state = read_client_state(directory, tag, rank, trusted)
    task_state = load_file(os.path.join(tag_dir, "task_state.pt"), trusted=trusted)
    return client_state, task_state
