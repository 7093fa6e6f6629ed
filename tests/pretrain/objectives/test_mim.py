"""Tests for pretrain/objectives/mim.py: MAE masking, targets, positions and the whole term against direct
computations written from ViCHA's and MAE's definitions.

Run: ``.venv/bin/python -m pytest -q tests/pretrain/objectives/test_mim.py``.
"""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.config import ConfigError, from_mapping
from pretrain.objectives.base import BuildContext, StepContext
from pretrain.objectives.mim import (
    MaskedImageModelling,
    MaskedImageModellingConfig,
    masked_patch_loss,
    patchify,
    random_masking,
    sincos_positions,
)
from tests.pretrain.vicha_helpers import tiny_backbone, tiny_images


def test_random_masking_keeps_the_first_of_a_sorted_noise_and_marks_the_rest():
    generator = torch.Generator().manual_seed(5)
    keep, mask, restore = random_masking(3, 16, 0.75, generator=generator)
    noise = torch.rand(3, 16, generator=torch.Generator().manual_seed(5))
    assert keep.shape == (3, 4) and mask.shape == (3, 16)
    for row in range(3):
        order = sorted(range(16), key=lambda patch: float(noise[row, patch]))
        assert keep[row].tolist() == order[:4]                       # kept in the shuffled order
        assert [patch for patch in range(16) if mask[row, patch] == 0] == sorted(order[:4])
        assert [order[int(position)] for position in restore[row]] == list(range(16))  # inverse permutation
    assert mask.sum().item() == 3 * 12
    again = random_masking(3, 16, 0.75, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(a, b) for a, b in zip((keep, mask, restore), again, strict=True))


def test_random_masking_draws_from_the_process_generator_when_given_none():
    torch.manual_seed(11)
    first = random_masking(2, 16, 0.5)
    torch.manual_seed(11)
    assert torch.equal(first[0], random_masking(2, 16, 0.5)[0])
    with pytest.raises(ValueError, match="keeps no patch"):
        random_masking(2, 4, 0.9)


def test_patchify_lists_patches_row_major_each_as_rows_columns_channels():
    images = torch.randn(2, 3, 8, 12)
    patches = patchify(images, 4)
    assert patches.shape == (2, 6, 48)
    for row in range(2):
        for column in range(3):
            block = images[:, :, 4 * row:4 * row + 4, 4 * column:4 * column + 4]
            assert torch.equal(patches[:, row * 3 + column], block.permute(0, 2, 3, 1).reshape(2, 48))


def test_masked_patch_loss_normalises_each_patch_and_averages_masked_patches_only():
    generator = torch.Generator().manual_seed(3)
    prediction, target = torch.randn(2, 4, 6, generator=generator), torch.randn(2, 4, 6, generator=generator)
    mask = torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 1]])
    total = 0.0
    for b in range(2):
        for n in range(4):
            if mask[b, n]:
                values = target[b, n].tolist()
                mean = sum(values) / 6
                variance = sum((v - mean) ** 2 for v in values) / 5          # unbiased, as torch.var
                normalised = [(v - mean) / math.sqrt(variance + 1e-6) for v in values]
                total += sum((float(p) - t) ** 2 for p, t in zip(prediction[b, n], normalised, strict=True)) / 6
    assert float(masked_patch_loss(prediction, target, mask)) == pytest.approx(total / 3, rel=1e-5)
    raw = float(((prediction - target) ** 2).mean(-1)[mask.bool()].mean())
    assert float(masked_patch_loss(prediction, target, mask, normalise_target=False)) == pytest.approx(raw, rel=1e-6)


def test_sincos_positions_follow_mae_columns_then_rows_sin_then_cos():
    table = sincos_positions(8, 3)
    assert table.shape == (10, 8) and torch.equal(table[0], torch.zeros(8))
    for row in range(3):
        for column in range(3):
            expected = []
            for coordinate in (column, row):
                angles = [coordinate / 10000 ** (k / 2) for k in range(2)]
                expected += [math.sin(a) for a in angles] + [math.cos(a) for a in angles]
            assert table[1 + row * 3 + column].tolist() == pytest.approx(expected, abs=1e-6)


def _objective(**options):
    model, tokenizer = tiny_backbone(depth=2)
    config = from_mapping(MaskedImageModellingConfig, {"decoder_width": 32, "decoder_heads": 2, **options}, "mim")
    torch.manual_seed(4)
    objective = MaskedImageModelling(config, BuildContext(model, tokenizer, 4, 10, 0.0)).eval()
    with torch.no_grad():  # a non-zero mask token, so that the test sees where it goes
        objective.mask_token.normal_()
    return model, objective


@pytest.mark.parametrize("cls_position", [False, True])
def test_term_is_the_vit_on_kept_patches_then_the_decoder_then_the_masked_loss(cls_position):
    model, objective = _objective(cls_position=cls_position)
    images = tiny_images()
    step = StepContext(step=0, alpha=0.0, model=model, momentum=None, training=True)
    torch.manual_seed(9)
    term = objective(None, None, {"image": images}, step)["mim"]

    torch.manual_seed(9)
    keep, mask, restore = random_masking(4, 4, 0.75)
    encoder = model.visual_encoder
    patches = encoder.patch_embed(images) + encoder.pos_embed[:, 1:]
    kept = torch.stack([patches[b, keep[b]] for b in range(4)])
    cls = encoder.cls_token + (encoder.pos_embed[:, :1] if cls_position else 0)
    hidden = torch.cat([cls.expand(4, -1, -1), kept], dim=1)
    for block in encoder.blocks:
        hidden = block(hidden)
    latent = objective.decoder_embed(encoder.norm(hidden))
    full = torch.empty(4, 5, latent.shape[-1])
    full[:, 0] = latent[:, 0]
    for b in range(4):
        for position in range(4):
            if mask[b, position] == 0:
                full[b, 1 + position] = latent[b, 1 + keep[b].tolist().index(position)]
            else:
                full[b, 1 + position] = objective.mask_token[0, 0]
    full = full + sincos_positions(32, 2)
    for block in objective.decoder_blocks:
        full = block(full)
    prediction = objective.mae_proj(objective.decoder_norm(full))[:, 1:]
    expected = masked_patch_loss(prediction, patchify(images, 16), mask)
    assert term.item() == pytest.approx(expected.item(), rel=1e-5)
    assert mask.sum() == 12


def test_options_are_checked():
    with pytest.raises(ConfigError, match="mask_ratio: must lie in"):
        from_mapping(MaskedImageModellingConfig, {"mask_ratio": 1.0}, "objectives.mim")
    with pytest.raises(ConfigError, match="decoder_width: must be divisible by decoder_heads"):
        from_mapping(MaskedImageModellingConfig, {"decoder_width": 30, "decoder_heads": 4}, "objectives.mim")
    model, tokenizer = tiny_backbone(depth=2)
    with pytest.raises(ConfigError, match=r"mask_ratio=0.9 keeps no patch of 4"):
        MaskedImageModelling(MaskedImageModellingConfig(mask_ratio=0.9, decoder_width=32, decoder_heads=2),
                             BuildContext(model, tokenizer, 4, 10, 0.0))
