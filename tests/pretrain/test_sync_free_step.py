"""The training step never waits for the device: no host synchronisation in forward, backward, hard-negative
sampling, queue updates or the momentum update.

On a GPU every value the host reads back (``.item()``, ``bool(t)``, ``.cpu()``, ``.tolist()``) and every op
whose output size depends on the data (``nonzero``, boolean-mask indexing, ``masked_select``, ``unique``)
stalls the launch queue until the GPU catches up. ``pretrain.host_sync.HostSyncGuard`` finds them on the
CPU, where the tests run; the guard itself is checked here on injected syncs of every kind.
"""

from __future__ import annotations

import pytest
import torch

from pretrain.host_sync import HostSyncError, HostSyncGuard
from tests.pretrain.test_build import tiny_task

TEXTS = ["a red circle", "two blue squares", "a green triangle", "one small square"]


def training_step_setup(*overrides: str):
    task, tokenizer = tiny_task("objectives.itc.queue_size=8", "distillation.alpha=0.4", *overrides, micro_batch=4)
    task.train()
    optimizer = torch.optim.AdamW(task.parameter_groups(0.02), lr=1e-4)
    torch.manual_seed(1)
    batch = {"image": torch.randn(4, 3, 32, 32), **tokenizer(TEXTS)}
    return task, optimizer, batch


def forward_backward(task, batch, step: int) -> dict:
    """The task's part of a step as the loop runs it: forward (momentum update, momentum forward, ITC with
    queues, ITM hard negatives, MLM) and backward; the losses stay on the device."""
    task.set_step(step)
    losses = task(batch)
    losses["loss"].backward()
    return losses


def optimizer_step(optimizer) -> None:
    """Outside the guard: torch's single-tensor AdamW reads its CPU step counters (no device sync on a GPU,
    where the fused AdamW the GPU runs use keeps them on the device)."""
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# The one sync kept: MLM finds its scored positions (``pretrain.objectives.mlm.mlm_loss`` says why), once
# for the online and momentum logits together.
KEPT = {"mlm_loss": 1}


def test_the_training_step_performs_no_host_sync():
    task, optimizer, batch = training_step_setup()
    forward_backward(task, batch, 0)  # first use: lazy initialisation may read values once
    optimizer_step(optimizer)
    queue = task.objectives["itc"].queues[0]
    before = queue.features.clone()
    for step in (1, 2):  # step 2 wraps the queue around (8 = 2 steps of 4)
        with HostSyncGuard(allowed=KEPT) as guard:
            losses = forward_backward(task, batch, step)
        optimizer_step(optimizer)
        assert guard.allowed_seen == KEPT
    assert set(losses) == {"loss", "itc", "itm", "mlm"}
    assert torch.isfinite(losses["loss"]).all()
    assert not torch.equal(before, queue.features)  # the queue moved


@pytest.fixture(scope="module")
def trained_once():
    task, optimizer, batch = training_step_setup()
    forward_backward(task, batch, 0)
    optimizer_step(optimizer)
    return task, optimizer, batch


@pytest.mark.parametrize("sync", [
    lambda t: t.item(),
    lambda t: bool((t > 0).any()),
    lambda t: t.tolist(),
    lambda t: t[t > 0],
    lambda t: torch.nonzero(t),
    lambda t: float(t.sum()),
])
def test_the_guard_catches_an_injected_sync(sync, trained_once, monkeypatch):
    task, _, batch = trained_once
    real_forward = task.objectives["itm"].forward

    def forward_with_a_sync(encoded, encoded_m, batch, context):
        out = real_forward(encoded, encoded_m, batch, context)
        sync(out["itm"].detach().reshape(1))
        return out

    monkeypatch.setattr(task.objectives["itm"], "forward", forward_with_a_sync)
    with pytest.raises(HostSyncError), HostSyncGuard(allowed=KEPT):
        forward_backward(task, batch, 1)
