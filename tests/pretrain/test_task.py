"""The pretraining task: momentum copies only for what objectives ask, the ramp and EMA in optimizer steps,
ITM's negatives from ITC's similarities, extra state that round-trips (and reads the older layout)."""

from __future__ import annotations

import pytest
import torch

from pretrain.objectives.momentum import alpha_at
from pretrain.task import upgrade_task_state
from tests.pretrain.test_build import tiny_task

TEXTS = ["a red circle", "two blue squares", "a green triangle", "one small square"]


def batch_for(tokenizer, size: int = 2) -> dict:
    torch.manual_seed(1)
    return {"image": torch.randn(size, 3, 32, 32), **tokenizer(TEXTS[:size])}


@pytest.mark.parametrize("overrides, towers", [
    ((), ("visual_encoder", "vision_proj", "text_encoder", "text_proj")),
    (("objectives.itc.momentum_distillation=false",), ("visual_encoder", "text_encoder")),  # MLM's targets
    (("objectives.itc.momentum_distillation=false", "distillation.alpha=0"), ()),
    (("objectives.itc.momentum_distillation=false", "objectives.mlm.weight=0"), ()),
])
def test_momentum_copies_are_the_union_of_what_objectives_ask(overrides, towers):
    task, tokenizer = tiny_task(*overrides)
    assert task.momentum_towers == towers
    assert (task.momentum is None) == (not towers)
    saved = task.extra_state_dict()["momentum"]
    assert {key.split(".")[0].removesuffix("_m") for key in saved} == set(towers)
    losses = task(batch_for(tokenizer))
    assert torch.isfinite(losses["loss"])


def test_the_alpha_ramp_and_the_ema_count_optimizer_steps_not_forwards():
    task, tokenizer = tiny_task("distillation.alpha=0.4", "objectives.itc.queue_size=0")
    task.train()
    batch = batch_for(tokenizer)
    copy = task.momentum["vision_proj"].weight
    updates = []
    for step in (0, 0, 3, 3):  # two accumulation windows of two micro-batches each
        task.set_step(step)
        before = copy.clone()
        task(batch)
        updates.append(not torch.equal(before, copy))
        assert task.log_values()["alpha"] == pytest.approx(alpha_at(0.4, step, task.steps_per_epoch))
    assert updates == [True, False, True, False]  # once per optimizer step


def test_itm_draws_negatives_from_itcs_similarities_when_itc_ran(monkeypatch):
    task, tokenizer = tiny_task("objectives.itc.queue_size=0")
    seen = []
    import pretrain.objectives.itm as itm_module

    real = itm_module.sample_hard_negatives

    def recording(sim_i2t, sim_t2i, exclude):
        seen.append(sim_i2t.clone())
        return real(sim_i2t, sim_t2i, exclude)

    monkeypatch.setattr(itm_module, "sample_hard_negatives", recording)
    shared = {}
    real_itc_forward = task.objectives["itc"].forward

    def itc_forward(encoded, encoded_m, batch, step):
        out = real_itc_forward(encoded, encoded_m, batch, step)
        shared.update(step.shared)
        return out

    monkeypatch.setattr(task.objectives["itc"], "forward", itc_forward)
    task.eval()
    task(batch_for(tokenizer, 4))
    torch.testing.assert_close(seen[0], shared["itc_similarity"][0].float(), rtol=0, atol=0)

    alone, tokenizer = tiny_task("objectives.itc.weight=0", "objectives.mlm.weight=0")
    alone.eval()
    seen.clear()
    batch = batch_for(tokenizer, 4)
    alone(batch)
    encoded = alone.model.encode(batch["image"], batch["input_ids"], batch["attention_mask"])
    expected = encoded.image_feat.float() @ encoded.text_feat.float().T / alone.model.temp.float()
    torch.testing.assert_close(seen[0], expected)


def test_extra_state_round_trips_and_records_the_method_and_objectives():
    task, tokenizer = tiny_task("objectives.itc.queue_size=4")
    task.train()
    task(batch_for(tokenizer))
    state = task.extra_state_dict()
    assert state["method"] == "albef"
    assert state["objectives"]["itc"] == {"class": "pretrain.objectives.itc:ITC", "weight": 1.0, "start_step": 0}
    fresh, _ = tiny_task("objectives.itc.queue_size=4")
    fresh.load_extra_state_dict(state)
    torch.testing.assert_close(fresh.objectives["itc"].queues[0].features, task.objectives["itc"].queues[0].features)
    torch.testing.assert_close(fresh.momentum["text_proj"].weight, task.momentum["text_proj"].weight)

    # The ALBEF-only task's layout (momentum, queues and a step at the top level) loads as these objectives.
    itc = state["objective_state"]["itc"]
    older = {"step": 1, "momentum": state["momentum"], "image_queue": itc["image_queue"],
             "text_queue": itc["text_queue"]}
    assert upgrade_task_state(older)["objective_state"]["itc"] == itc
    fresh.load_extra_state_dict(older)

    no_mlm, _ = tiny_task("objectives.itc.queue_size=4", "objectives.mlm.weight=0")
    with pytest.raises(KeyError, match=r"trained with objectives \['itc', 'itm', 'mlm'\], this run lists "
                                       r"\['itc', 'itm'\]"):
        no_mlm.load_extra_state_dict(state)
