"""PEVL's generalised MLM: grouped position masking (statistics of many draws) and the soft position loss against
PEVL's own table and expression, and against a direct loop.

    .venv/bin/python -m pytest -q tests/pretrain/objectives/test_position.py
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pretrain.config import ConfigError, from_mapping
from pretrain.objectives.mlm import IGNORE_INDEX
from pretrain.objectives.position import (
    PositionMLMConfig,
    choose_position_groups,
    mask_with_positions,
    soft_position_loss,
    soft_position_targets,
)

VOCAB = 30522
OPEN, CLOSE, MASK, PAD, CLS = 205, 718, 103, 0, 101
POSITIONS = range(206, 718)
SPECIAL = {"positions": POSITIONS, "box_open_id": OPEN, "vocab_size": VOCAB, "mask_token_id": MASK,
           "pad_token_id": PAD, "cls_token_id": CLS}


def group(*bins: int) -> list[int]:
    return [OPEN, *(206 + value for value in bins), CLOSE]


def batch_ids() -> torch.Tensor:
    rows = [[CLS, 2000, 3899, *group(1, 2, 3, 4), 2006, 1037, *group(10, 20, 30, 40)],
            [CLS, 2000, *group(7, 8, 9, 511), 2003, PAD, PAD, PAD, PAD, PAD, PAD],
            [CLS, 2000, 2001, 2002, 2003, 2004, 2005, 2006, 2007, 2008, OPEN, 206 + 5, 206 + 6]]  # cut group
    width = max(map(len, rows))
    return torch.tensor([row + [PAD] * (width - len(row)) for row in rows])


def test_groups_mask_one_to_four_of_the_tokens_after_each_box_open_uniformly():
    ids = batch_ids()
    generator = torch.Generator().manual_seed(0)
    counts = {1: 0, 2: 0, 3: 0, 4: 0}
    slots = torch.zeros(ids.shape)
    draws = 3000
    for _ in range(draws):
        chosen = choose_position_groups(ids, OPEN, POSITIONS, generator)
        assert not chosen[~((ids >= 206) & (ids < 718))].any()      # only position tokens
        counts[int(chosen[0, 4:8].sum())] += 1                        # the first group of row 0
        assert 1 <= int(chosen[1, 3:7].sum()) <= 4
        assert 1 <= int(chosen[2, 11:13].sum()) <= 2                  # a group cut after two tokens
        slots += chosen
    for k in counts:
        assert abs(counts[k] / draws - 0.25) < 0.03, counts
    # Every slot of a full group is drawn alike: E[k] / 4 = 2.5 / 4.
    assert torch.allclose(slots[0, 4:8] / draws, torch.full((4,), 0.625), atol=0.03)
    # The cut group: k = 1 gives one slot, k >= 2 both: each slot (0.25 * 0.5 + 0.75) = 0.875.
    assert torch.allclose(slots[2, 11:13] / draws, torch.full((2,), 0.875), atol=0.03)


def test_text_masking_never_chooses_positions_pad_or_cls_and_splits_80_10_10():
    ids = batch_ids()
    generator = torch.Generator().manual_seed(1)
    is_position = (ids >= 206) & (ids < 718)
    text_chosen, text_total, masked, randomised, kept = 0, 0, 0, 0, 0
    for _ in range(2000):
        masked_ids, labels = mask_with_positions(ids, probability=0.3, generator=generator, **SPECIAL)
        chosen = labels != IGNORE_INDEX
        assert torch.equal(labels[chosen], ids[chosen])
        assert not chosen[(ids == PAD) | (ids == CLS)].any()
        text = chosen & ~is_position
        text_chosen += int(text.sum())
        text_total += int(((ids != PAD) & (ids != CLS) & ~is_position).sum())
        masked += int((masked_ids[chosen] == MASK).sum())
        kept += int((masked_ids[chosen] == ids[chosen]).sum())
        randomised += int(((masked_ids[chosen] != MASK) & (masked_ids[chosen] != ids[chosen])).sum())
        assert torch.equal(masked_ids[~chosen], ids[~chosen])
    total = masked + kept + randomised
    assert abs(text_chosen / text_total - 0.3) < 0.02        # @@ and ## are text here, as in PEVL
    assert abs(masked / total - 0.8) < 0.02 and abs(randomised / total - 0.1) < 0.02


def test_all_masking_masks_every_position_token_and_nothing_else_at_probability_zero():
    ids = batch_ids()
    masked_ids, labels = mask_with_positions(ids, probability=0.0, masking="all", **SPECIAL)
    is_position = (ids >= 206) & (ids < 718)
    assert torch.equal(labels != IGNORE_INDEX, is_position)
    assert (masked_ids[is_position] == MASK).all() and torch.equal(masked_ids[~is_position], ids[~is_position])


def pevl_soft_loss(logits: torch.Tensor, labels: torch.Tensor, decay: float, weight: float) -> torch.Tensor:
    """PEVL's table (numpy, as model_pretrain.py builds it) and its loss expression."""
    distances = np.array([np.abs(np.arange(512) - row) for row in range(512)])
    rows = np.exp(-decay * distances)
    table = torch.zeros(800, VOCAB)
    for bin_index in range(512):
        table[206 + bin_index, 206:718] = torch.Tensor(rows[bin_index] / np.sum(rows[bin_index]))
    selected = (labels > OPEN) & (labels < CLOSE) & (labels != -100)
    return -torch.sum(F.log_softmax(logits[selected], dim=1) * table[labels[selected]], dim=-1).mean() * weight


@pytest.mark.parametrize("decay", [0.15, 0.25])
def test_soft_loss_equals_pevls_computation(decay):
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 6, VOCAB, generator=generator) * 3
    labels = torch.full((2, 6), IGNORE_INDEX)
    labels[0, 1], labels[0, 4], labels[1, 2], labels[1, 3] = 206 + 0, 206 + 300, 206 + 511, 2054  # 2054: text
    ours = 2.0 * soft_position_loss(logits, labels, POSITIONS, soft_position_targets(512, decay))
    torch.testing.assert_close(ours, pevl_soft_loss(logits, labels, decay, 2.0), rtol=1e-6, atol=1e-6)


def test_soft_loss_over_the_position_slice_against_a_direct_loop():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 3, 1000, generator=generator)
    positions = range(100, 110)
    labels = torch.tensor([[103, 109, IGNORE_INDEX]])
    decay = 0.5
    expected = 0.0
    for token, label in ((0, 103), (1, 109)):
        weights = [math.exp(-decay * abs((label - 100) - j)) for j in range(10)]
        slice_logits = logits[0, token, 100:110].tolist()
        log_norm = math.log(sum(math.exp(value) for value in slice_logits))
        expected += -sum(w / sum(weights) * (value - log_norm) for w, value in zip(weights, slice_logits, strict=True))
    result = soft_position_loss(logits, labels, positions, soft_position_targets(10, decay), "positions")
    assert result.item() == pytest.approx(expected / 2, rel=1e-5)


def test_soft_targets_are_normalised_and_peak_on_the_bin():
    targets = soft_position_targets(512, 0.15)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(512))
    assert torch.equal(targets.argmax(dim=1), torch.arange(512))
    assert targets[0, 1] / targets[0, 0] == pytest.approx(math.exp(-0.15), rel=1e-6)


def test_no_position_token_gives_a_zero_in_the_graph():
    logits = torch.randn(1, 2, VOCAB, requires_grad=True)
    loss = soft_position_loss(logits, torch.tensor([[IGNORE_INDEX, 2054]]), POSITIONS, soft_position_targets(512, 0.1))
    loss.backward()
    assert loss.item() == 0.0 and logits.grad is not None


def test_options_are_checked():
    with pytest.raises(ConfigError, match="masking"):
        from_mapping(PositionMLMConfig, {"masking": "some"}, "objectives.position_mlm")
    with pytest.raises(ConfigError, match="decay"):
        from_mapping(PositionMLMConfig, {"decay": 0}, "objectives.position_mlm")


def test_sinusoidal_init_spreads_the_bins_and_leaves_every_other_row():
    from dataclasses import replace

    from pretrain.config import resolve_path
    from pretrain.models.albef import build_albef
    from pretrain.objectives.base import BuildContext
    from pretrain.objectives.position import PositionMLM, sinusoidal_position_embeddings
    from pretrain.text.tokenizer import build_tokenizer
    from tests.pretrain.conftest import TINY_MODEL

    bert_dir = resolve_path(TINY_MODEL["bert_dir"])
    model = build_albef(TINY_MODEL["vision"], TINY_MODEL["image_size"], bert_dir, TINY_MODEL["fusion_layer"],
                        embed_dim=TINY_MODEL["embed_dim"], vision_overrides=TINY_MODEL["vision_overrides"],
                        text_overrides=TINY_MODEL["text_overrides"])
    embeddings = model.text_encoder.bert.embeddings.word_embeddings.weight
    before = embeddings.detach().clone()
    build = BuildContext(model=model, tokenizer=build_tokenizer(bert_dir, max_length=16), global_batch=8,
                         steps_per_epoch=10, distillation_alpha=0.0)
    PositionMLM(PositionMLMConfig(), build)  # PEVL's "keep"
    assert torch.equal(embeddings, before)
    with pytest.raises(ConfigError, match="init_checkpoint"):  # a loaded checkpoint's bins are never overwritten
        PositionMLM(PositionMLMConfig(init_embeddings="sinusoidal"), replace(build, from_checkpoint=True))
    assert torch.equal(embeddings, before)
    PositionMLM(PositionMLMConfig(init_embeddings="sinusoidal"), build)
    table = sinusoidal_position_embeddings(512, embeddings.shape[1], before.norm(dim=1).mean().item())
    torch.testing.assert_close(embeddings[206:718].detach(), table)
    assert torch.equal(embeddings[:206], before[:206]) and torch.equal(embeddings[718:], before[718:])
    assert model.text_encoder.cls.predictions.decoder.weight.data_ptr() == embeddings.data_ptr()  # tied
    neighbours = torch.nn.functional.cosine_similarity(table[:-1], table[1:])
    far = torch.nn.functional.cosine_similarity(table[:-100], table[100:])
    assert neighbours.min() > far.mean()
