"""Tests for pretrain/objectives/itm.py: hard-negative sampling (exclusions, degenerate rows, the sampling
distribution), labels, validity mask and loss.

Run: ``.venv/bin/python -m pytest -q tests/pretrain/objectives/test_itm.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from pretrain.objectives.itm import (
    HardNegatives,
    diagonal_exclusion,
    has_allowed_negative,
    itm_labels,
    itm_loss,
    itm_valid_mask,
    same_image_exclusion,
    sample_hard_negatives,
)


def _check_choices(negative_image_index, negative_text_index, exclude):
    """Chosen pairs are allowed wherever a row has an allowed candidate; otherwise the documented fallback."""
    batch_size = exclude.shape[0]
    for text in range(batch_size):
        image = int(negative_image_index[text])
        if (~exclude[:, text]).any():
            assert not exclude[image, text], (image, text)
        else:
            assert image != text or batch_size == 1
    for image in range(batch_size):
        text = int(negative_text_index[image])
        if (~exclude[image]).any():
            assert not exclude[image, text], (image, text)
        else:
            assert text != image or batch_size == 1


@settings(max_examples=150, deadline=None)
@given(
    batch_size=st.integers(1, 7),
    seed=st.integers(0, 2**31 - 1),
    exclusion=st.sampled_from(["diagonal", "same_image", "random"]),
    nan_rows=st.booleans(),
)
def test_never_picks_an_excluded_pair(batch_size, seed, exclusion, nan_rows):
    generator = torch.Generator().manual_seed(seed)
    sim_i2t = torch.randn(batch_size, batch_size, generator=generator) * 20
    sim_t2i = torch.randn(batch_size, batch_size, generator=generator) * 20
    if exclusion == "diagonal":
        exclude = diagonal_exclusion(batch_size)
    elif exclusion == "same_image":
        exclude = same_image_exclusion(torch.randint(0, 3, (batch_size,), generator=generator))
    else:
        exclude = torch.rand(batch_size, batch_size, generator=generator) < 0.6
    if nan_rows:
        sim_i2t[0, -1] = float("nan")
        sim_t2i[-1, 0] = float("inf")
    negatives = sample_hard_negatives(sim_i2t, sim_t2i, exclude, generator=generator)
    assert negatives.negative_image_index.shape == negatives.negative_text_index.shape == (batch_size,)
    _check_choices(*negatives, exclude)


def test_batch_of_one_returns_itself_without_error():
    negative_image_index, negative_text_index = sample_hard_negatives(
        torch.zeros(1, 1), torch.zeros(1, 1), diagonal_exclusion(1)
    )
    assert negative_image_index.tolist() == [0] and negative_text_index.tolist() == [0]
    assert itm_valid_mask(diagonal_exclusion(1)).tolist() == [True, False, False]


def test_all_pairs_same_image_fall_back_to_other_indices():
    exclude = same_image_exclusion(torch.tensor([5, 5, 5, 5]))
    for seed in range(20):
        generator = torch.Generator().manual_seed(seed)
        negatives = sample_hard_negatives(torch.randn(4, 4), torch.randn(4, 4), exclude, generator)
        assert all(int(index) != row for row, index in enumerate(negatives.negative_image_index))
        assert all(int(index) != row for row, index in enumerate(negatives.negative_text_index))
    assert itm_valid_mask(exclude).tolist() == [True] * 4 + [False] * 8


def test_all_nan_similarities_draw_uniformly_over_allowed():
    exclude = diagonal_exclusion(3)
    nan = torch.full((3, 3), float("nan"))
    counts = torch.zeros(3, 3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        negative_image_index, _ = sample_hard_negatives(nan, nan, exclude, generator)
        counts[torch.arange(3), negative_image_index] += 1
    assert torch.equal(counts.diagonal(), torch.zeros(3))
    off_diagonal = counts[~exclude]
    assert bool((off_diagonal > 100).all()) and bool((off_diagonal < 200).all())


def test_text_rows_use_the_transposed_exclusion():
    # Image 0 may not pair with text 1, but image 1 may pair with text 0: an asymmetric mask.
    exclude = torch.tensor([[True, True, False], [False, True, False], [False, False, True]])
    for seed in range(30):
        generator = torch.Generator().manual_seed(seed)
        negatives = sample_hard_negatives(torch.zeros(3, 3), torch.zeros(3, 3), exclude, generator)
        _check_choices(*negatives, exclude)
        assert int(negatives.negative_image_index[1]) == 2  # text 1: images 0 and 1 are both excluded


def test_draws_follow_softmax_over_allowed_entries():
    """Chi-square goodness of fit per row against softmax over the allowed entries, fixed seed, 2000 draws."""
    sim_i2t = torch.tensor([[0.0, 1.0, 2.0, -1.0], [0.5, 9.0, 0.0, 1.0], [2.0, 2.0, 2.0, 0.0], [1.0, -2.0, 0.0, 3.0]])
    sim_t2i = sim_i2t.T.contiguous() * 0.5
    exclude = diagonal_exclusion(4)
    draws = 2000
    generator = torch.Generator().manual_seed(1234)
    text_counts, image_counts = torch.zeros(4, 4), torch.zeros(4, 4)
    for _ in range(draws):
        negative_image_index, negative_text_index = sample_hard_negatives(sim_i2t, sim_t2i, exclude, generator)
        text_counts[torch.arange(4), negative_text_index] += 1
        image_counts[torch.arange(4), negative_image_index] += 1
    for counts, similarity in ((text_counts, sim_i2t), (image_counts, sim_t2i)):
        for row in range(4):
            allowed = [column for column in range(4) if column != row]
            expected = F.softmax(similarity[row, allowed], dim=0) * draws
            chi_square = float(((counts[row, allowed] - expected) ** 2 / expected).sum())
            assert counts[row, row] == 0
            assert chi_square < 16.3, (row, chi_square)  # 99.97% quantile with 2 degrees of freedom


def test_generator_makes_draws_reproducible():
    sims = torch.randn(6, 6, generator=torch.Generator().manual_seed(3))
    first = sample_hard_negatives(sims, sims.T, diagonal_exclusion(6), torch.Generator().manual_seed(9))
    second = sample_hard_negatives(sims, sims.T, diagonal_exclusion(6), torch.Generator().manual_seed(9))
    assert isinstance(first, HardNegatives)
    assert torch.equal(first.negative_image_index, second.negative_image_index)
    assert torch.equal(first.negative_text_index, second.negative_text_index)


def test_shape_errors_name_the_argument():
    with pytest.raises(ValueError, match="exclude"):
        sample_hard_negatives(torch.zeros(3, 3), torch.zeros(3, 3), torch.zeros(3, 4, dtype=torch.bool))


def test_exclusion_helpers():
    assert same_image_exclusion(torch.tensor([1, 2, 1])).tolist() == [
        [True, False, True], [False, True, False], [True, False, True]
    ]
    assert torch.equal(diagonal_exclusion(3), torch.eye(3, dtype=torch.bool))
    exclude = torch.tensor([[True, True], [False, True]])
    text_has_negative_image, image_has_negative_text = has_allowed_negative(exclude)
    assert text_has_negative_image.tolist() == [True, False]
    assert image_has_negative_text.tolist() == [False, True]
    assert itm_valid_mask(exclude).tolist() == [True, True, True, False, False, True]


def test_labels_and_plain_cross_entropy():
    assert itm_labels(2).tolist() == [1, 1, 0, 0, 0, 0]
    logits = torch.randn(6, 2, generator=torch.Generator().manual_seed(0), requires_grad=True)
    labels = itm_labels(2)
    loss = itm_loss(logits, labels)
    rows = logits.detach().tolist()
    expected = sum(-math.log(math.exp(row[label]) / sum(math.exp(value) for value in row))
                   for row, label in zip(rows, labels.tolist(), strict=True)) / 6
    torch.testing.assert_close(loss, torch.tensor(float(expected)))
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels))


def test_loss_with_valid_mask_averages_over_valid_rows_only():
    logits = torch.randn(6, 2, generator=torch.Generator().manual_seed(1))
    labels = itm_labels(2)
    valid = torch.tensor([True, True, False, True, True, False])
    torch.testing.assert_close(itm_loss(logits, labels, valid), F.cross_entropy(logits[valid], labels[valid]))
    all_valid = torch.ones(6, dtype=torch.bool)
    torch.testing.assert_close(itm_loss(logits, labels, all_valid), F.cross_entropy(logits, labels))
