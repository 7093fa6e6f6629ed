"""Tests for pretrain/objectives/hitc.py: ViCHA's hierarchical ITC against a direct computation.

Run: ``.venv/bin/python -m pytest -q tests/pretrain/objectives/test_hitc.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pretrain.config import ConfigError, from_mapping
from pretrain.methods import resolve_objectives
from pretrain.objectives.base import BuildContext, StepContext
from pretrain.objectives.hitc import HierarchicalITC, HierarchicalITCConfig, hierarchical_itc_loss
from pretrain.schema import PretrainConfig
from tests.pretrain.vicha_helpers import CAPTIONS, tiny_backbone, tiny_images


def _loop_infonce(image: torch.Tensor, text: torch.Tensor, temp: float) -> torch.Tensor:
    """(i2t + t2i) / 2 with the diagonal as the target, written as per-row sums in float64."""
    total = 0.0
    rows = image.shape[0]
    for left, right in ((image, text), (text, image)):
        for row in range(rows):
            logits = [float(left[row].detach() @ right[column].detach()) / temp for column in range(rows)]
            total -= logits[row] - math.log(sum(math.exp(value) for value in logits))
    return torch.tensor(total / (2 * rows), dtype=torch.float64)


def test_loss_is_the_weighted_sum_of_per_pair_infonce_on_projected_normalised_cls():
    generator = torch.Generator().manual_seed(0)
    pairs, batch, width, hidden, embed = 3, 5, 8, 6, 4
    image_cls = [torch.randn(batch, width, generator=generator) for _ in range(pairs)]
    text_cls = [torch.randn(batch, hidden, generator=generator) for _ in range(pairs)]
    torch.manual_seed(1)
    vision = nn.ModuleList(nn.Linear(width, embed) for _ in range(pairs))
    text = nn.ModuleList(nn.Linear(hidden, embed) for _ in range(pairs))
    weights = [1.0, 0.5, 2.0]
    loss = hierarchical_itc_loss(image_cls, text_cls, vision, text, 0.07, weights)
    expected = sum(weight * _loop_infonce(F.normalize(vision[i](image_cls[i]).double(), dim=-1),
                                          F.normalize(text[i](text_cls[i]).double(), dim=-1), 0.07)
                   for i, weight in enumerate(weights))
    assert loss.item() == pytest.approx(float(expected), rel=1e-5)
    loss.backward()
    assert all(projection.weight.grad is not None for projection in (*vision, *text))


def test_objective_reads_layer_normed_vit_cls_of_chosen_blocks_and_chosen_text_layers():
    model, tokenizer = tiny_backbone(depth=3, text_layers=3)
    config = HierarchicalITCConfig(image_layers=(1, 3), text_layers=(2, 1), pair_weights=(1.0, 0.25))
    build = BuildContext(model=model, tokenizer=tokenizer, global_batch=4, steps_per_epoch=10, distillation_alpha=0)
    objective = HierarchicalITC(config, build)
    assert objective.needs().wants.image_layers == {1, 3} and objective.needs().wants.text_layers == {1, 2}
    images = tiny_images()
    tokens = tokenizer(CAPTIONS)
    encoded = model.encode(images, tokens["input_ids"], tokens["attention_mask"], objective.needs().wants)
    step = StepContext(step=0, alpha=0.0, model=model, momentum=None, training=True)
    term = objective(encoded, None, {}, step)["hitc"]

    # The states by hand: every block in turn, the final norm after each; the text layers one by one.
    encoder, text_encoder = model.visual_encoder, model.text_encoder
    hidden = encoder.embed(images)
    image_states = {}
    for index, block in enumerate(encoder.blocks, start=1):
        hidden = block(hidden)
        image_states[index] = encoder.norm(hidden)[:, 0]
    text_hidden = text_encoder.bert.embeddings(input_ids=tokens["input_ids"])
    text_states = {}
    mask = text_encoder._self_attention_mask(text_hidden, tokens["attention_mask"])
    for index, layer in enumerate(text_encoder.bert.encoder.layer[: text_encoder.fusion_layer], start=1):
        text_hidden = layer(text_hidden, mask)
        text_states[index] = text_hidden[:, 0]
    temp = model.temp.item()
    expected = sum(weight * _loop_infonce(
        F.normalize(objective.vision_proj_hidden[i](image_states[image_layer]).double(), dim=-1),
        F.normalize(objective.text_proj_hidden[i](text_states[text_layer]).double(), dim=-1), temp)
        for i, (image_layer, text_layer, weight) in enumerate(zip((1, 3), (2, 1), (1.0, 0.25), strict=True)))
    assert term.item() == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("options, message", [
    ({"image_layers": [1, 9], "text_layers": [1, 2]}, r"objectives.hitc.image_layers: \[9\] outside 0..3"),
    ({"image_layers": [1], "text_layers": [4]}, r"objectives.hitc.text_layers: \[4\] outside 0..3"),
    ({"image_layers": [1, 2], "text_layers": [1]}, r"objectives.hitc.text_layers: pairs with image_layers in order"),
    ({"image_layers": [1], "text_layers": [1], "pair_weights": [1, 2]}, r"pair_weights: needs one weight per pair"),
])
def test_layer_choices_are_checked_against_the_encoders_with_the_key_named(options, message):
    model, tokenizer = tiny_backbone(depth=3, text_layers=3)
    config = from_mapping(PretrainConfig, {"method": "vicha", "objectives": {"hitc": options}})
    with pytest.raises(ConfigError, match=message):
        spec = next(spec for spec in resolve_objectives(config) if spec.name == "hitc")
        HierarchicalITC(spec.options, BuildContext(model, tokenizer, 4, 10, 0.0))
