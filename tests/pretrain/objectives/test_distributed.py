"""Tests for pretrain/objectives/distributed.py: single-process identities and a real 2-rank gloo group.

``spawn_gloo(worker, tmp_path)`` starts two CPU processes joined in a gloo process group on 127.0.0.1
and is reused by the queue and in-batch contrastive tests. Workers save what they computed under
``tmp_path``; the comparisons with a one-process computation happen here, in the parent.

Run: ``.venv/bin/python -m pytest -q tests/pretrain/objectives/test_distributed.py``.
"""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pretrain.objectives.distributed import all_gather_with_grad, concat_all_gather, world

WORLD_SIZE = 2
ROWS_PER_RANK = 3
FEATURES = 4


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _join_and_run(rank: int, world_size: int, port: int, worker, out_dir: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        torch.save(worker(rank, world_size), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def spawn_gloo(worker, tmp_path, world_size: int = WORLD_SIZE) -> list[dict]:
    """Run ``worker(rank, world_size) -> dict`` on ``world_size`` gloo ranks; return the dicts in rank order."""
    mp.spawn(_join_and_run, args=(world_size, _free_port(), worker, str(tmp_path)), nprocs=world_size, join=True)
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world_size)]


def _global_rows() -> torch.Tensor:
    return torch.randn(WORLD_SIZE * ROWS_PER_RANK, FEATURES, generator=torch.Generator().manual_seed(7))


def _rank_loss(gathered: torch.Tensor, rank: int) -> torch.Tensor:
    """A loss that weighs every row differently on each rank, so wrong slicing or summing shows."""
    weights = torch.arange(gathered.numel(), dtype=gathered.dtype).reshape(gathered.shape) / 10 + rank
    return ((gathered * weights).sum(dim=1) ** 2).sum() * (rank + 1)


def _gather_worker(rank: int, world_size: int) -> dict:
    local = _global_rows()[rank * ROWS_PER_RANK : (rank + 1) * ROWS_PER_RANK].clone().requires_grad_(True)
    gathered = all_gather_with_grad(local)
    _rank_loss(gathered, rank).backward()
    no_grad = concat_all_gather(local * 2)
    ids = concat_all_gather(torch.arange(2) + 10 * rank)
    uneven_message = ""
    try:
        concat_all_gather(torch.zeros(2 + rank, 1))
    except ValueError as error:
        uneven_message = str(error)
    return {
        "world": world(), "gathered": gathered.detach(), "grad": local.grad, "no_grad": no_grad,
        "no_grad_requires_grad": no_grad.requires_grad, "ids": ids, "uneven_message": uneven_message,
    }


def test_world_is_single_process_without_a_group():
    assert not dist.is_initialized()
    assert world() == (0, 1)


def test_gathers_are_identity_without_a_group():
    tensor = torch.randn(3, 2, requires_grad=True)
    assert all_gather_with_grad(tensor) is tensor
    gathered = concat_all_gather(tensor)
    assert torch.equal(gathered, tensor)
    assert not gathered.requires_grad


def test_two_ranks_gather_in_rank_order_and_route_gradients(tmp_path):
    results = spawn_gloo(_gather_worker, tmp_path)
    rows = _global_rows().requires_grad_(True)
    total = sum(_rank_loss(rows, rank) for rank in range(WORLD_SIZE))
    (expected_grad,) = torch.autograd.grad(total, rows)

    for rank, result in enumerate(results):
        assert result["world"] == (rank, WORLD_SIZE)
        torch.testing.assert_close(result["gathered"], rows.detach(), rtol=0, atol=0)
        # Each rank gets the gradient of its own rows with respect to the sum of every rank's loss.
        own = slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)
        torch.testing.assert_close(result["grad"], expected_grad[own])
        torch.testing.assert_close(result["no_grad"], rows.detach() * 2, rtol=0, atol=0)
        assert not result["no_grad_requires_grad"]
        assert result["ids"].tolist() == [0, 1, 10, 11]
        assert "[2, 3]" in result["uneven_message"]
    # Guards the all-reduce in backward: without it rank 0 would see only its own loss's gradient.
    (own_loss_only,) = torch.autograd.grad(_rank_loss(rows, 0), rows)
    assert not torch.allclose(results[0]["grad"], own_loss_only[:ROWS_PER_RANK])
