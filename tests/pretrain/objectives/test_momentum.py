"""Tests for pretrain/objectives/momentum.py: EMA copies (plain and under a real DeepSpeed ZeRO-3 engine on
CPU), feature queues (one process and two gloo ranks) and the alpha warm-up.

The ZeRO-3 test runs DeepSpeed in a spawned process so that its process group and accelerator choice
never leak into other tests. Run: ``.venv/bin/python -m pytest -q tests/pretrain/objectives/test_momentum.py``.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from pretrain.objectives.momentum import FeatureQueue, MomentumCopy, alpha_at
from tests.pretrain.objectives.test_distributed import spawn_gloo


def _online(seed: int = 0) -> dict[str, nn.Module]:
    torch.manual_seed(seed)
    return {"visual_encoder": nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), "text_proj": nn.Linear(4, 2)}


def _perturb(modules: dict[str, nn.Module], seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules.values():
            for parameter in module.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator))


def test_update_is_the_ema_formula_parameter_by_parameter():
    online = _online()
    momentum = MomentumCopy(online, momentum=0.9)
    before = {name: [p.clone() for p in momentum[name].parameters()] for name in online}
    _perturb(online, seed=1)
    momentum.update(online)
    for name, module in online.items():
        for old, new, updated in zip(before[name], module.parameters(), momentum[name].parameters(), strict=True):
            torch.testing.assert_close(updated, 0.9 * old + 0.1 * new.detach())


@pytest.mark.parametrize("online_dtype", [torch.float32, torch.bfloat16])
def test_update_is_bit_for_bit_the_per_parameter_mul_add(online_dtype):
    """The multi-tensor update gives exactly ALBEF's ``p_m.mul_(m).add_(p, alpha=1 - m)`` per parameter,
    also from bf16 online weights (a bf16 engine's) into the fp32 copies."""
    online = _online()
    momentum = MomentumCopy(online, momentum=0.995)
    _perturb(online, seed=3)
    for module in online.values():
        module.to(online_dtype)
    expected = {name: [p.clone().mul_(0.995).add_(o.detach().float(), alpha=1.0 - 0.995)
                       for p, o in zip(momentum[name].parameters(), online[name].parameters(), strict=True)]
                for name in online}
    momentum.update(online)
    for name in online:
        for want, got in zip(expected[name], momentum[name].parameters(), strict=True):
            assert torch.equal(want, got)


def test_update_exact_on_a_scalar():
    online = {"scalar": nn.Linear(1, 1, bias=False)}
    with torch.no_grad():
        online["scalar"].weight.fill_(1.0)
    momentum = MomentumCopy(online, momentum=0.75)
    with torch.no_grad():
        online["scalar"].weight.fill_(5.0)
    momentum.update(online)
    assert momentum["scalar"].weight.item() == 0.75 * 1.0 + 0.25 * 5.0
    momentum.update(online)
    assert momentum["scalar"].weight.item() == 0.75 * 2.0 + 0.25 * 5.0


def test_buffers_are_copied_but_not_averaged():
    online = _online()
    momentum = MomentumCopy(online)
    with torch.no_grad():
        online["visual_encoder"][1].running_mean.fill_(3.0)
    momentum.update(online)
    assert torch.equal(momentum["visual_encoder"][1].running_mean, torch.zeros(4))


def test_copies_are_independent_frozen_fp32_and_outside_the_online_tree():
    online = _online()
    online["text_proj"].to(torch.bfloat16)

    class Task(nn.Module):
        def __init__(self):
            super().__init__()
            self.visual_encoder = online["visual_encoder"]
            self.text_proj = online["text_proj"]
            self.momentum = MomentumCopy({"visual_encoder": self.visual_encoder, "text_proj": self.text_proj})

    task = Task()
    momentum_parameters = [p for name in online for p in task.momentum[name].parameters()]
    online_ids = {id(p) for p in task.parameters()}
    assert not any(id(p) in online_ids for p in momentum_parameters)
    assert not any(key.endswith("_m") or "_m." in key for key in task.state_dict())
    assert all(not p.requires_grad and p.dtype == torch.float32 for p in momentum_parameters)
    torch.testing.assert_close(task.momentum["text_proj"].weight, online["text_proj"].weight.float(), rtol=0, atol=0)
    with torch.no_grad():
        online["text_proj"].weight.add_(1.0)
    assert not torch.equal(task.momentum["text_proj"].weight, online["text_proj"].weight.float())


def test_copy_from_overwrites_with_online_weights():
    online = _online()
    momentum = MomentumCopy(online, momentum=0.5)
    _perturb(online, seed=2)
    momentum.copy_from(online)
    for name, module in online.items():
        for source, copied in zip(module.parameters(), momentum[name].parameters(), strict=True):
            assert torch.equal(source, copied)


def test_mismatched_online_modules_raise():
    momentum = MomentumCopy(_online())
    with pytest.raises(KeyError, match="do not match"):
        momentum.update({"visual_encoder": _online()["visual_encoder"]})
    with pytest.raises(ValueError, match="momentum"):
        MomentumCopy(_online(), momentum=1.5)


def test_state_dict_uses_albef_names_and_round_trips():
    momentum = MomentumCopy(_online(), momentum=0.5)
    _perturb(momentum.modules, seed=3)
    state = momentum.state_dict()
    assert set(state) == {
        "visual_encoder_m.0.weight", "visual_encoder_m.0.bias", "visual_encoder_m.1.weight", "visual_encoder_m.1.bias",
        "visual_encoder_m.1.running_mean", "visual_encoder_m.1.running_var", "visual_encoder_m.1.num_batches_tracked",
        "text_proj_m.weight", "text_proj_m.bias",
    }
    restored = MomentumCopy(_online(seed=9))
    restored.load_state_dict({key: value.clone() for key, value in state.items()})
    for key, value in restored.state_dict().items():
        assert torch.equal(value, state[key]), key
    broken = dict(state)
    broken["text_proj_m.extra"] = broken.pop("text_proj_m.bias")
    with pytest.raises(KeyError, match=r"text_proj_m\.bias.*text_proj_m\.extra"):
        restored.load_state_dict(broken)


def test_train_and_eval_reach_every_copy():
    momentum = MomentumCopy(_online())
    momentum.eval()
    assert not any(module.training for name in momentum.names() for module in momentum[name].modules())
    momentum.train()
    assert all(module.training for name in momentum.names() for module in momentum[name].modules())


def test_queue_starts_with_unit_columns_and_is_reproducible():
    queue = FeatureQueue(5, 8, generator=torch.Generator().manual_seed(0), with_ids=True)
    assert queue.features.shape == (5, 8)
    torch.testing.assert_close(queue.features.norm(dim=0), torch.ones(8))
    assert torch.equal(queue.features, FeatureQueue(5, 8, generator=torch.Generator().manual_seed(0)).features)
    assert queue.ids.shape == (1, 8) and bool((queue.ids == -100).all())
    assert queue.ptr.tolist() == [0]


def test_enqueue_writes_at_ptr_and_wraps_around():
    queue = FeatureQueue(2, 6, with_ids=True)
    batches = [torch.full((2, 2), float(step)) + torch.tensor([[0.0], [0.5]]) for step in range(4)]
    for step, batch in enumerate(batches[:3]):
        queue.enqueue(batch, ids=torch.tensor([10 * step, 10 * step + 1]))
    assert queue.ptr.tolist() == [0]
    assert torch.equal(queue.features, torch.cat(batches[:3]).T)
    assert queue.ids.tolist() == [[0, 1, 10, 11, 20, 21]]
    queue.enqueue(batches[3], ids=torch.tensor([30, 31]))
    assert queue.ptr.tolist() == [2]
    assert torch.equal(queue.features, torch.cat([batches[3], batches[1], batches[2]]).T)
    assert queue.ids.tolist() == [[30, 31, 10, 11, 20, 21]]


def test_size_zero_queue_means_in_batch_negatives_only():
    queue = FeatureQueue(3, 0)
    queue.enqueue(torch.ones(4, 3))
    assert queue.features.shape == (3, 0) and queue.ptr.tolist() == [0]
    with pytest.raises(ValueError, match="size >= 0"):
        FeatureQueue(3, -1)


def test_enqueue_rejects_a_batch_that_does_not_divide_the_queue():
    queue = FeatureQueue(2, 5)
    message = r"queue_size 5 .* global batch 2 \(world size 1 x micro batch 2\)"
    with pytest.raises(ValueError, match=message):
        queue.enqueue(torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"\[batch, 2\]"):
        queue.enqueue(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="with_ids"):
        queue.enqueue(torch.zeros(5, 2), ids=torch.arange(5))


def test_queue_state_dict_round_trip():
    queue = FeatureQueue(3, 4, with_ids=True)
    queue.enqueue(torch.ones(2, 3), ids=torch.tensor([7, 8]))
    restored = FeatureQueue(3, 4, generator=torch.Generator().manual_seed(5), with_ids=True)
    restored.load_state_dict({key: value.clone() for key, value in queue.state_dict().items()})
    for key, value in queue.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key
    with pytest.raises(ValueError, match="queue shape"):
        FeatureQueue(3, 8).load_state_dict(queue.state_dict())


def _queue_worker(rank: int, world_size: int) -> dict:
    queue = FeatureQueue(2, 8, with_ids=True)
    queue.enqueue(torch.full((2, 2), float(rank + 1)), ids=torch.tensor([rank * 10, rank * 10 + 1]))
    message = ""
    try:
        FeatureQueue(2, 6).enqueue(torch.zeros(2, 2))
    except ValueError as error:
        message = str(error)
    return {"features": queue.features, "ids": queue.ids, "ptr": queue.ptr, "message": message}


def test_two_rank_queue_holds_both_ranks_in_rank_order(tmp_path):
    for result in spawn_gloo(_queue_worker, tmp_path):
        assert torch.equal(result["features"][:, :4], torch.tensor([[1.0, 1.0, 2.0, 2.0]] * 2))
        assert result["ids"].tolist() == [[0, 1, 10, 11, -100, -100, -100, -100]]
        assert result["ptr"].tolist() == [4]
        assert "global batch 4 (world size 2 x micro batch 2)" in result["message"]


def test_alpha_matches_albef_first_epoch_ramp():
    alpha, steps_per_epoch = 0.4, 7
    for epoch in range(3):
        for index in range(steps_per_epoch):
            expected = alpha * min(1, index / steps_per_epoch) if epoch == 0 else alpha
            assert alpha_at(alpha, epoch * steps_per_epoch + index, steps_per_epoch) == pytest.approx(expected)
    assert alpha_at(0.4, 0, 100) == 0.0
    assert alpha_at(0.4, 50, 100) == pytest.approx(0.2)
    assert alpha_at(0.4, 3, 100, warmup=False) == 0.4
    with pytest.raises(ValueError, match="steps_per_epoch"):
        alpha_at(0.4, 3, 0)


def _zero3_worker(rank: int, world_size: int) -> dict:
    """ZeRO-3 engine on CPU (gloo); returns partition status, EMA results and a copy made from the partitions."""
    os.environ["DS_ACCELERATOR"] = "cpu"
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    import deepspeed

    torch.manual_seed(0)
    net = _tied_net()

    class Task(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net
            self.momentum = MomentumCopy({"net": self.net}, momentum=0.9)  # a plain attribute, like the task modules
            self.update_in_forward = False

        def forward(self, inputs):
            if self.update_in_forward:  # where ALBEF updates: first thing in the training forward
                self.momentum.update({"net": self.net})
            return self.net(inputs).square().mean()

    task = Task()
    config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3},
              "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=task, optimizer=torch.optim.SGD(task.parameters(), lr=0.5), config=config)
    partitioned = [
        (p.numel(), str(p.ds_status), p.ds_tensor.numel() < p.ds_numel) for p in engine.module.net.parameters()
    ]
    momentum_untouched = all(not hasattr(p, "ds_id") and p.numel() > 0 for p in task.momentum["net"].parameters())

    torch.manual_seed(1 + rank)  # different data on each rank, as in real data parallelism
    loss = engine(torch.randn(2, 4))
    engine.backward(loss)
    engine.step()
    before = [p.clone() for p in task.momentum["net"].parameters()]
    with deepspeed.zero.GatheredParameters(list(net.parameters()), modifier_rank=None):
        online_after_step = [p.detach().clone() for p in net.parameters()]
    task.update_in_forward = True
    engine.backward(engine(torch.randn(2, 4)))
    engine.step()
    task.momentum.update({"net": engine.module.net})  # and once more outside any forward
    from_partitioned = MomentumCopy({"net": engine.module.net})
    with deepspeed.zero.GatheredParameters(list(net.parameters()), modifier_rank=None):
        online_final = [p.detach().clone() for p in net.parameters()]
    inputs = torch.randn(5, 4)
    copied = from_partitioned["net"]
    return {
        "partitioned": partitioned, "momentum_untouched": momentum_untouched, "before": before,
        "online_after_step": online_after_step, "online_final": online_final,
        "updated": [p.clone() for p in task.momentum["net"].parameters()],
        "from_partitioned": [p.clone() for p in copied.parameters()],
        "still_tied": copied[0].weight is copied[2].weight,
        "from_partitioned_output": copied(inputs), "inputs": inputs, "copy_state": from_partitioned.state_dict(),
    }


def _tied_net() -> nn.Sequential:
    """Two linear maps sharing one weight (like BERT's decoder tied to the word embeddings), then a layer
    whose 15 elements do not split evenly over two ranks, so ZeRO-3 pads its partitions."""
    net = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))
    net[2].weight = net[0].weight
    return net


def test_tied_weights_stay_tied_in_the_copy():
    online = {"net": _tied_net()}
    momentum = MomentumCopy(online, momentum=0.5)
    assert momentum["net"][0].weight is momentum["net"][2].weight
    _perturb(online, seed=4)
    momentum.update(online)
    assert momentum["net"][0].weight is momentum["net"][2].weight


@pytest.mark.slow
def test_update_under_a_real_zero3_engine_sees_whole_weights(tmp_path):
    results = spawn_gloo(_zero3_worker, tmp_path, world_size=2)
    for key in ("updated", "from_partitioned"):
        for rank_0, rank_1 in zip(results[0][key], results[1][key], strict=True):
            assert torch.equal(rank_0, rank_1), key  # every rank holds the same whole copy
    for result in results:
        _check_zero3_result(result)


def _check_zero3_result(result: dict) -> None:
    # Partitioned: no whole data in the parameter, and each rank holds only a part of it.
    assert all(numel == 0 and status == "ZeroParamStatus.NOT_AVAILABLE" and part for numel, status, part in
               result["partitioned"])
    assert result["momentum_untouched"]
    for old, online, final, updated in zip(
        result["before"], result["online_after_step"], result["online_final"], result["updated"], strict=True
    ):
        assert not torch.equal(online, old) and not torch.equal(final, online)  # the optimizer steps moved the weights
        # First update inside the engine's forward (weights after step 1), then outside it (after step 2).
        torch.testing.assert_close(updated, 0.9 * (0.9 * old + 0.1 * online) + 0.1 * final)
    # A copy made from the partitioned module holds whole weights, keeps the tie and runs without DeepSpeed's hooks.
    assert result["still_tied"]
    for copied, online in zip(result["from_partitioned"], result["online_final"], strict=True):
        assert torch.equal(copied, online)
    reference = _tied_net()
    with torch.no_grad():
        for parameter, value in zip(reference.parameters(), result["online_final"], strict=True):
            parameter.copy_(value)
        torch.testing.assert_close(result["from_partitioned_output"], reference(result["inputs"]))
