"""X-VLM's region terms against direct computations on a tiny backbone in eval mode (fp32):

- region features: each region on its own through the ViT blocks written out by hand, the last blocks' attention
  keys masked to its box with X-VLM's additive -10000 (ViT), or the mean of its in-box grid tokens (Swin);
- masked cross-attention: the same as cross-attending to the allowed image tokens alone;
- region ITC, ITM, MLM and the box terms: the formulas written out.

Run: ``.venv/bin/python -m pytest -q tests/pretrain/objectives/test_region.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pretrain.build import build_backbone
from pretrain.config import from_mapping
from pretrain.models.regions import box_patch_mask
from pretrain.objectives.base import BuildContext, StepContext
from pretrain.objectives.itm import diagonal_exclusion, sample_hard_negatives
from pretrain.objectives.region import RegionITC, RegionITM, RegionMLM, region_itm_logits
from pretrain.objectives.region_box import Box, BoxConfig
from pretrain.objectives.region_encoding import encode_region_batch, region_encoding
from pretrain.objectives.span_mlm import MaskingVocabulary, SpanMLMConfig, span_mask_batch
from pretrain.schema import ModelConfig
from tests.pretrain.conftest import TINY_MODEL

IMAGE = 32  # 4 x 4 grid of 8 px patches
MODEL = {**TINY_MODEL, "vision_overrides": {"depth": 3, "embed_dim": 64, "num_heads": 2, "patch_size": 8},
         "image_size": IMAGE, "itm_head": "mlp", "local_attn_depth": 2}
BOXES = torch.tensor([[0.0, 0.0, 32.0, 32.0], [3.0, 5.0, 17.0, 15.0], [16.0, 16.0, 32.0, 24.0],
                      [0.0, 0.0, 32.0, 32.0], [9.5, 1.0, 12.0, 30.0]])
IMAGE_INDEX = torch.tensor([0, 0, 0, 1, 1])
IS_IMAGE = torch.tensor([True, False, False, True, False])
TEXTS = ["two shapes on grey", "red circle", "small blue square", "a triangle", "green bar"]


def backbone(overrides=None):
    torch.manual_seed(0)
    model, tokenizer = build_backbone(from_mapping(ModelConfig, {**MODEL, **(overrides or {})}))
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = backbone()
    tokens = tokenizer(TEXTS)
    torch.manual_seed(1)
    regions = {"image": torch.randn(2, 3, IMAGE, IMAGE), "input_ids": tokens["input_ids"],
               "attention_mask": tokens["attention_mask"], "image_index": IMAGE_INDEX, "boxes": BOXES,
               "is_image": IS_IMAGE}
    return model, tokenizer, regions


def step_of(model) -> StepContext:
    return StepContext(step=0, alpha=0.0, model=model, momentum=None, training=False)


def build_context(model, tokenizer) -> BuildContext:
    return BuildContext(model=model, tokenizer=tokenizer, global_batch=5, steps_per_epoch=1, distillation_alpha=0.0)


def key_mask(box: torch.Tensor) -> torch.Tensor:
    """[CLS] + the 4 x 4 cells a box covers by X-VLM's rule, spelled out: floor(x0/8) .. ceil(x1/8) - 1."""
    x0, y0, x1, y1 = box.tolist()
    cells = torch.zeros(4, 4, dtype=torch.bool)
    first_x, first_y = min(int(x0 // 8), 3), min(int(y0 // 8), 3)
    stop_x, stop_y = max(first_x + 1, min(-int(-x1 // 8), 4)), max(first_y + 1, min(-int(-y1 // 8), 4))
    cells[first_y:stop_y, first_x:stop_x] = True
    return torch.cat([torch.ones(1, dtype=torch.bool), cells.flatten()])


def manual_block(block, x: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """One pre-norm ViT block written out, keys outside ``allowed`` pushed down by 10000 (X-VLM's image_atts)."""
    batch, tokens, width = x.shape
    heads = block.attn.num_heads
    qkv = block.attn.qkv(block.norm1(x)).reshape(batch, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    scores = q @ k.transpose(-2, -1) * (width // heads) ** -0.5
    if allowed is not None:
        scores = scores + (1.0 - allowed.float())[:, None, None, :] * -10000.0
    out = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, tokens, width)
    x = x + block.attn.proj(out)
    return x + block.mlp(block.norm2(x))


def manual_region_tokens(encoder, image: torch.Tensor, allowed: torch.Tensor, masked_blocks: int) -> torch.Tensor:
    x = encoder.patch_embed(image[None])
    x = torch.cat([encoder.cls_token.expand(1, -1, -1), x], dim=1) + encoder.pos_embed
    for index, block in enumerate(encoder.blocks):
        x = manual_block(block, x, allowed[None] if index >= len(encoder.blocks) - masked_blocks else None)
    return encoder.norm(x)[0]


def test_box_masks_follow_x_vlms_rule(tiny):
    model, _, _ = tiny
    patches = box_patch_mask(BOXES, model.visual_encoder.grid_size, model.visual_encoder.patch_size)
    assert torch.equal(torch.cat([torch.ones(5, 1, dtype=torch.bool), patches], dim=1),
                       torch.stack([key_mask(box) for box in BOXES]))


def test_vit_region_features_equal_each_region_run_alone_with_masked_attention(tiny):
    model, _, regions = tiny
    with torch.no_grad():
        encoded = encode_region_batch(model, regions)
        for index, (box, image) in enumerate(zip(BOXES, IMAGE_INDEX, strict=True)):
            tokens = manual_region_tokens(model.visual_encoder, regions["image"][image], key_mask(box), 2)
            torch.testing.assert_close(encoded.region_tokens[index], tokens, atol=1e-5, rtol=1e-5)
            feature = F.normalize(model.vision_proj(tokens[0]), dim=-1)
            torch.testing.assert_close(encoded.region_feat[index], feature, atol=1e-5, rtol=1e-5)
        whole = model.visual_encoder(regions["image"])
        torch.testing.assert_close(encoded.image_tokens, whole, atol=1e-5, rtol=1e-5)
        # an image caption's region is the whole image: its sequence is the image's own
        torch.testing.assert_close(encoded.region_tokens[3], whole[1], atol=1e-5, rtol=1e-5)
    assert torch.equal(encoded.target[0], torch.tensor([0.5, 0.5, 1.0, 1.0]))
    torch.testing.assert_close(encoded.target[1], torch.tensor([10.0, 10.0, 14.0, 10.0]) / IMAGE)


def test_swin_region_features_are_the_mean_of_the_in_box_grid():
    model, tokenizer = backbone({"vision": "swin_tiny_patch4_window7_224", "image_size": 64,
                                 "vision_overrides": {"embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2],
                                                      "window_size": 4}})
    encoder = model.visual_encoder
    assert (encoder.grid_size, encoder.patch_size, encoder.width) == ((8, 8), (8, 8), 32)
    boxes = torch.tensor([[0.0, 0.0, 64.0, 64.0], [10.0, 3.0, 30.0, 20.0], [40.0, 50.0, 41.0, 64.0]])
    tokens = tokenizer(["a", "b c", "d"])
    torch.manual_seed(2)
    regions = {"image": torch.randn(2, 3, 64, 64), "input_ids": tokens["input_ids"],
               "attention_mask": tokens["attention_mask"], "image_index": torch.tensor([1, 0, 1]), "boxes": boxes,
               "is_image": torch.tensor([True, False, False])}
    with torch.no_grad():
        encoded = encode_region_batch(model, regions)
        grid = encoder.forward_features(regions["image"]).flatten(1, 2)  # [2, 64, 32] after the final norm
    for index, (box, image) in enumerate(zip(boxes, [1, 0, 1], strict=True)):
        x0, y0, x1, y1 = box.tolist()
        cells = [row * 8 + column for row in range(int(y0 // 8), -int(-y1 // 8))
                 for column in range(int(x0 // 8), -int(-x1 // 8))]
        torch.testing.assert_close(encoded.region_tokens[index, 0], grid[image, cells].mean(dim=0))
        torch.testing.assert_close(encoded.region_tokens[index, 1:], grid[image])
    torch.testing.assert_close(encoded.image_tokens[:, 0], grid.mean(dim=1))


def test_masked_cross_attention_is_cross_attention_to_the_allowed_tokens(tiny):
    model, _, regions = tiny
    with torch.no_grad():
        encoded = encode_region_batch(model, regions)
        fused = model.text_encoder.fuse(encoded.text_hidden, encoded.attention_mask, encoded.region_tokens,
                                        encoded.region_mask)
        for index in range(5):
            allowed = encoded.region_tokens[index][key_mask(BOXES[index])][None]
            alone = model.text_encoder.fuse(encoded.text_hidden[index:index + 1],
                                            encoded.attention_mask[index:index + 1], allowed)
            torch.testing.assert_close(fused[index], alone[0], atol=1e-5, rtol=1e-5)


def test_region_itc_is_the_symmetric_cross_entropy_of_the_region_similarities(tiny):
    model, tokenizer, regions = tiny
    step = step_of(model)
    loss = RegionITC(RegionITC.Config(), build_context(model, tokenizer))(None, None, {"streams": {"regions": regions}},
                                                                          step)["region_itc"]
    encoded = step.shared["region_encoding"]
    logits = encoded.region_feat @ encoded.text_feat.T / model.temp
    expected = (F.cross_entropy(logits, torch.arange(5)) + F.cross_entropy(logits.T, torch.arange(5))) / 2
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(step.shared["region_itc_similarity"], logits.detach())


def test_region_itm_pairs_each_text_with_a_hard_negative_region_and_its_mask(tiny):
    model, tokenizer, regions = tiny
    step = step_of(model)
    objective = RegionITM(RegionITM.Config(), build_context(model, tokenizer))
    torch.manual_seed(5)
    loss = objective(None, None, {"streams": {"regions": regions}}, step)["region_itm"]
    encoded = step.shared["region_encoding"]
    similarity = encoded.region_feat @ encoded.text_feat.T / model.temp
    torch.manual_seed(5)
    negative_region, negative_text = sample_hard_negatives(similarity, similarity.T, diagonal_exclusion(5))
    assert not (negative_region == torch.arange(5)).any() and not (negative_text == torch.arange(5)).any()

    def logit(text: int, region: int) -> torch.Tensor:
        allowed = encoded.region_tokens[region][key_mask(BOXES[region])][None]
        fused = model.text_encoder.fuse(encoded.text_hidden[text:text + 1], encoded.attention_mask[text:text + 1],
                                        allowed)
        return model.itm_head(fused[:, 0])[0]

    with torch.no_grad():
        pairs = ([(b, b) for b in range(5)] + [(b, int(negative_region[b])) for b in range(5)]
                 + [(int(negative_text[b]), b) for b in range(5)])
        expected_logits = torch.stack([logit(text, region) for text, region in pairs])
        logits = region_itm_logits(model, encoded, negative_region, negative_text)
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-5)
    labels = torch.tensor([1] * 5 + [0] * 10)
    torch.testing.assert_close(loss, F.cross_entropy(expected_logits, labels), atol=1e-5, rtol=1e-5)


def test_region_mlm_predicts_masked_region_text_reading_only_its_region(tiny):
    model, tokenizer, regions = tiny
    step = step_of(model)
    objective = RegionMLM(SpanMLMConfig(probability=0.5), build_context(model, tokenizer))
    torch.manual_seed(7)
    loss = objective(None, None, {"streams": {"regions": regions}}, step)["region_mlm"]
    encoded = step.shared["region_encoding"]
    torch.manual_seed(7)
    masked_ids, labels = span_mask_batch(regions["input_ids"], regions["attention_mask"],
                                         SpanMLMConfig(probability=0.5), MaskingVocabulary.of(tokenizer))
    assert (labels != -100).sum() >= 5
    text = model.text_encoder
    with torch.no_grad():
        losses = []
        for index in range(5):
            allowed = encoded.region_tokens[index][key_mask(BOXES[index])][None]
            hidden = text(masked_ids[index:index + 1], regions["attention_mask"][index:index + 1], allowed)
            logits = text.mlm_logits(hidden)[0]
            for position in torch.nonzero(labels[index] != -100).flatten().tolist():
                losses.append(F.cross_entropy(logits[position], labels[index, position]))
    torch.testing.assert_close(loss, torch.stack(losses).mean(), atol=1e-5, rtol=1e-5)


def xvlm_giou(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """GIoU of box pairs, as X-VLM's box_ops define it (xyxy; no epsilon)."""
    area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])  # noqa: E731
    top_left, bottom_right = torch.max(first[:, :2], second[:, :2]), torch.min(first[:, 2:], second[:, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=1)
    union = area(first) + area(second) - inter
    hull = (torch.max(first[:, 2:], second[:, 2:]) - torch.min(first[:, :2], second[:, :2])).clamp(min=0).prod(dim=1)
    return inter / union - (hull - union) / hull


def to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


@pytest.mark.parametrize("include_whole_image", [False, True])
def test_box_terms_regress_each_region_text_from_its_whole_image(tiny, include_whole_image):
    model, tokenizer, regions = tiny
    step = step_of(model)
    objective = Box(BoxConfig(include_whole_image=include_whole_image), build_context(model, tokenizer)).eval()
    losses = objective(None, None, {"streams": {"regions": regions}}, step)
    encoded = step.shared["region_encoding"]
    with torch.no_grad():
        predicted = []
        for index in range(5):
            image = model.visual_encoder(regions["image"][IMAGE_INDEX[index]][None])
            fused = model.text_encoder.fuse(encoded.text_hidden[index:index + 1],
                                            encoded.attention_mask[index:index + 1], image)
            layers = objective.head.layers
            predicted.append(layers[3](F.gelu(layers[1](layers[0](fused[0, 0])))).sigmoid())
        predicted = torch.stack(predicted)
    counted = torch.ones(5) if include_whole_image else (~IS_IMAGE).float()
    target = encoded.target
    l1 = ((predicted - target).abs().sum(dim=1) * counted).sum() / counted.sum()
    giou = ((1 - xvlm_giou(to_xyxy(predicted), to_xyxy(target))) * counted).sum() / counted.sum()
    torch.testing.assert_close(losses["box_l1"], l1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(losses["box_giou"], giou, atol=1e-5, rtol=1e-5)


def test_region_terms_are_silent_without_a_region_batch_and_share_one_encoding(tiny):
    model, tokenizer, regions = tiny
    build = build_context(model, tokenizer)
    objectives = [RegionITC(RegionITC.Config(), build), RegionITM(RegionITM.Config(), build),
                  RegionMLM(SpanMLMConfig(), build), Box(BoxConfig(), build)]
    step = step_of(model)
    assert all(objective(None, None, {"image": regions["image"]}, step) == {} for objective in objectives)
    assert region_encoding(step, {}) is None and "region_encoding" not in step.shared
    batch = {"streams": {"regions": regions}}
    terms = {}
    for objective in objectives:
        terms |= objective(None, None, batch, step)
        assert step.shared["region_encoding"] is region_encoding(step, batch)
    assert set(terms) == {"region_itc", "region_itm", "region_mlm", "box_l1", "box_giou"}
    with pytest.raises(ValueError, match=r"lacks \['boxes'\]"):
        region_encoding(step_of(model), {"streams": {"regions": {k: v for k, v in regions.items() if k != "boxes"}}})
