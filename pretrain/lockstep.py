"""Batches every rank takes in lockstep: each step starts only when all ranks have one, and a failure stops all.

Ranks read their own shards, so one rank can run out (exact mode: the end of its share of an epoch) or
fail (every shard it could read has vanished) while the others wait inside the next collective. Left
alone, the others die with the communication library's "Connection closed", and the launcher stops the
run before they can say why. ``lockstep_batches`` agrees on every batch first: a tiny all-reduce of a
status code over a CPU (gloo) group, which never waits for GPU work. When a rank ran out, every rank
ends the epoch there; when a rank failed, every rank raises ``DataFailure`` with the failing ranks' own
messages::

    control = control_group()
    for batch in lockstep_batches(loader, control):       # epoch after epoch
        ...
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist

HAVE, END, FAILED = 0, 1, 2


class DataFailure(RuntimeError):
    """A rank could not produce its next batch; raised on every rank with every failing rank's message."""


def control_group():
    """A gloo group over all ranks for small CPU-side agreements (None in a single process: nothing to agree)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    if dist.get_backend() == "gloo":
        return dist.group.WORLD
    return dist.new_group(backend="gloo")


def _agree(code: int, group) -> int:
    if group is None:  # one process: nothing to agree on
        return code
    flag = torch.tensor([code], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return int(flag.item())


def _failure_messages(error: BaseException | None, group) -> str:
    mine = None if error is None else f"{type(error).__name__}: {error}"
    if group is None:
        return f"rank 0: {mine}"
    messages = [None] * dist.get_world_size(group)
    dist.all_gather_object(messages, mine, group=group)
    return "; ".join(f"rank {rank}: {message}" for rank, message in enumerate(messages) if message is not None)


def lockstep_batches(loader, group=None) -> Iterator[dict]:
    """The loader's batches, epoch after epoch, each one agreed by every rank (see the module docstring).

    ``loader`` is iterable once per epoch and has ``end_epoch()`` (``data_shards.loader.StreamingLoader``).
    """
    while True:
        iterator = iter(loader)
        while True:
            error = batch = None
            try:
                batch = next(iterator)
                code = HAVE
            except StopIteration:
                code = END
            except Exception as failure:  # noqa: BLE001 - reported on every rank below, then raised
                code, error = FAILED, failure
            agreed = _agree(code, group)
            if agreed == FAILED:
                raise DataFailure(f"reading training data failed: {_failure_messages(error, group)}") from error
            if agreed == END:
                if code == HAVE:  # another rank ran out: this one stops the epoch at the same step
                    iterator.close()
                    loader.end_epoch()
                break
            yield batch
