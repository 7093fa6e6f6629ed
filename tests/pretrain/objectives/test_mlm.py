"""Tests for pretrain/objectives/mlm.py: masking rates and protected tokens on a big seeded tensor, and the
loss against an explicit per-position loop.

Run: ``.venv/bin/python -m pytest -q tests/pretrain/objectives/test_mlm.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.objectives.mlm import mask_tokens, mlm_loss

VOCAB, PAD, CLS, SEP, MASK = 1000, 0, 101, 102, 103
SPECIALS = {"vocab_size": VOCAB, "mask_token_id": MASK, "pad_token_id": PAD, "cls_token_id": CLS}


def _captions(rows=400, length=250, seed=0):
    """[CLS] + random words (ids 200..999) + trailing PAD, like a padded tokenizer batch."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(200, VOCAB, (rows, length), generator=generator)
    ids[:, 0] = CLS
    lengths = torch.randint(length // 2, length, (rows,), generator=generator)
    ids[torch.arange(length)[None, :] >= lengths[:, None]] = PAD
    ids[torch.arange(rows), lengths - 1] = SEP
    return ids


def test_rates_follow_albef_on_a_big_tensor():
    input_ids = _captions()
    masked_ids, labels = mask_tokens(input_ids, **SPECIALS, generator=torch.Generator().manual_seed(1))
    maskable = (input_ids != PAD) & (input_ids != CLS)
    chosen = labels != -100
    chosen_count = int(chosen.sum())
    assert abs(chosen_count / int(maskable.sum()) - 0.15) < 0.005
    to_mask = chosen & (masked_ids == MASK)
    unchanged = chosen & (masked_ids == input_ids)
    replaced = chosen & ~to_mask & ~unchanged
    assert abs(int(to_mask.sum()) / chosen_count - 0.8) < 0.01
    assert abs(int(replaced.sum()) / chosen_count - 0.1) < 0.01
    assert abs(int(unchanged.sum()) / chosen_count - 0.1) < 0.01
    # Random replacements are uniform over the whole vocabulary, special ids included (ALBEF).
    random_ids = masked_ids[replaced].float()
    assert abs(float(random_ids.mean()) - (VOCAB - 1) / 2) < 25
    assert bool((masked_ids[replaced] < 200).any())


def test_labels_hold_originals_at_chosen_positions_and_nothing_else_changes():
    input_ids = _captions(rows=50, length=40)
    original = input_ids.clone()
    masked_ids, labels = mask_tokens(input_ids, **SPECIALS, generator=torch.Generator().manual_seed(2))
    assert torch.equal(input_ids, original)
    chosen = labels != -100
    assert torch.equal(labels[chosen], input_ids[chosen])
    assert bool((labels[~chosen] == -100).all())
    assert torch.equal(masked_ids[~chosen], input_ids[~chosen])


def test_pad_cls_and_extra_ids_are_never_masked():
    input_ids = _captions(rows=100, length=60)
    for seed in range(5):
        masked_ids, labels = mask_tokens(input_ids, **SPECIALS, probability=0.9, never_mask_ids=(SEP,),
                                         generator=torch.Generator().manual_seed(seed))
        protected = (input_ids == PAD) | (input_ids == CLS) | (input_ids == SEP)
        assert bool((labels[protected] == -100).all())
        assert torch.equal(masked_ids[protected], input_ids[protected])
    _, labels = mask_tokens(input_ids, **SPECIALS, probability=0.9, generator=torch.Generator().manual_seed(0))
    assert bool((labels[input_ids == SEP] != -100).any())  # SEP is maskable unless listed


def test_generator_makes_masking_deterministic():
    input_ids = _captions(rows=20, length=30)
    first = mask_tokens(input_ids, **SPECIALS, generator=torch.Generator().manual_seed(5))
    second = mask_tokens(input_ids, **SPECIALS, generator=torch.Generator().manual_seed(5))
    third = mask_tokens(input_ids, **SPECIALS, generator=torch.Generator().manual_seed(6))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[1], third[1])


def test_probability_bounds():
    input_ids = _captions(rows=4, length=10)
    _, labels = mask_tokens(input_ids, **SPECIALS, probability=0.0)
    assert bool((labels == -100).all())
    with pytest.raises(ValueError, match="probability"):
        mask_tokens(input_ids, **SPECIALS, probability=1.5)


def _loss_inputs():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, generator=generator).requires_grad_(True)
    logits_m = torch.randn(2, 4, 5, generator=generator).requires_grad_(True)
    labels = torch.tensor([[-100, 3, -100, 0], [4, -100, -100, 1]])
    return logits, logits_m, labels


def _loop_loss(logits, labels, logits_m, alpha):
    cross_entropy, distill, count = 0.0, 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            label = int(labels[b, t])
            if label == -100:
                continue
            row = logits[b, t].tolist()
            log_normaliser = math.log(sum(math.exp(value) for value in row))
            momentum_row = logits_m[b, t].tolist()
            momentum_normaliser = sum(math.exp(value) for value in momentum_row)
            cross_entropy += -(row[label] - log_normaliser)
            distill += -sum(math.exp(momentum_row[v]) / momentum_normaliser * (row[v] - log_normaliser)
                            for v in range(len(row)))
            count += 1
    return (1 - alpha) * cross_entropy / count + alpha * distill / count


@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_loss_equals_the_loop_formula(alpha):
    logits, logits_m, labels = _loss_inputs()
    loss = mlm_loss(logits, labels, logits_m, alpha)
    assert loss.item() == pytest.approx(_loop_loss(logits, labels, logits_m, alpha), rel=1e-5)


def test_alpha_zero_is_plain_cross_entropy_and_momentum_gets_no_gradient():
    logits, logits_m, labels = _loss_inputs()
    expected = F.cross_entropy(logits.reshape(-1, 5), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(mlm_loss(logits, labels), expected)
    torch.testing.assert_close(mlm_loss(logits, labels, logits_m, 0.0), expected)
    mlm_loss(logits, labels, logits_m, 0.4).backward()
    assert logits.grad is not None and logits_m.grad is None
    assert bool((logits.grad[labels == -100] == 0).all())


def test_no_scored_position_gives_zero_in_the_graph():
    logits, _, _ = _loss_inputs()
    loss = mlm_loss(logits, torch.full((2, 4), -100), logits.detach(), 0.4)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_low_precision_logits_are_scored_in_fp32():
    logits, logits_m, labels = _loss_inputs()
    low = mlm_loss(logits.detach().bfloat16(), labels, logits_m.detach().bfloat16(), 0.4)
    assert low.dtype == torch.float32
    expected = mlm_loss(logits.detach().bfloat16().float(), labels, logits_m.detach().bfloat16().float(), 0.4)
    torch.testing.assert_close(low, expected)
