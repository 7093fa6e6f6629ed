"""Numbers: with the same tiny random weights and inputs, our X-VLM computes what X-VLM's code defines (fp32, eval
mode, within 1e-5): region features (ViT local attention; Swin in-box pooling), ITC similarities and loss, ITM
logits, box predictions and box losses, on regions and on whole images.

The reference below is written from X-VLM's model definitions (``models/xvlm.py`` ``XVLMBase``, ``models/vit.py``,
``models/swin_transformer.py``, ``models/xbert.py``, ``models/box_ops.py``, the region masks of
``dataset/pretrain_dataset.py``): plain tensor code on a state dict in X-VLM's released layout
(tests/pretrain/xvlm_released.py). Our side imports that state (pretrain/importers/xvlm.py) and runs the objectives'
own functions.

Run: ``.venv/bin/python -m pytest -q tests/pretrain/test_xvlm_reference.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.build import build_backbone
from pretrain.config import from_mapping
from pretrain.importers.xvlm import import_xvlm
from pretrain.models.albef import from_albef_state_dict
from pretrain.objectives.box import BoxHead, box_losses
from pretrain.objectives.itc import contrastive_loss_in_batch
from pretrain.objectives.region import region_itm_logits
from pretrain.objectives.region_box import predict_region_boxes
from pretrain.objectives.region_encoding import encode_region_batch
from pretrain.schema import ModelConfig
from tests.pretrain.conftest import TINY_MODEL
from tests.pretrain.xvlm_released import SwinShape, TextShape, ViTShape, released_state

TEXT = TextShape()
LN_TEXT = 1e-12  # the BERT config's layer_norm_eps


# --- the reference: X-VLM's definitions, on its released state -------------------------------------------------
def linear(state, name, x):
    return F.linear(x, state[f"{name}.weight"], state.get(f"{name}.bias"))


def layer_norm(state, name, x, eps):
    return F.layer_norm(x, x.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"], eps)


def attention(q, k, v, heads, additive=None):
    batch, queries, width = q.shape
    split = lambda t: t.view(batch, -1, heads, width // heads).transpose(1, 2)  # noqa: E731
    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(width // heads)
    if additive is not None:
        scores = scores + additive
    return (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(batch, queries, width)


def vit_block(state, name, x, heads, atts=None):
    """X-VLM vit.Block: pre-norm, image_atts as (1 - m) * -10000 added to the scores."""
    h = layer_norm(state, f"{name}.norm1", x, 1e-6)
    q, k, v = linear(state, f"{name}.attn.qkv", h).chunk(3, dim=-1)
    additive = None if atts is None else ((1.0 - atts) * -10000.0)[:, None, None, :]
    x = x + linear(state, f"{name}.attn.proj", attention(q, k, v, heads, additive))
    h = layer_norm(state, f"{name}.norm2", x, 1e-6)
    return x + linear(state, f"{name}.mlp.fc2", F.gelu(linear(state, f"{name}.mlp.fc1", h)))


def xvlm_vit(state, image, heads, depth, local_attn_depth, idx_to_group_img=None, image_atts=None):
    """X-VLM VisionTransformer.forward: returns image embeds, or (region embeds, full-attention embeds)."""
    p = "vision_encoder."
    x = F.conv2d(image, state[p + "patch_embed.proj.weight"], state[p + "patch_embed.proj.bias"],
                 stride=state[p + "patch_embed.proj.weight"].shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([state[p + "cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + state[p + "pos_embed"]
    atts = None
    if idx_to_group_img is not None:
        atts = torch.cat([image_atts, torch.ones(x.shape[:2])], dim=0)
    gathered = idx_to_group_img is not None
    for index in range(depth):
        if index >= depth - local_attn_depth:
            if gathered:
                x = torch.cat([x[idx_to_group_img], x], dim=0)
                gathered = False
            x = vit_block(state, f"{p}blocks.{index}", x, heads, atts)
        else:
            x = vit_block(state, f"{p}blocks.{index}", x, heads)
    x = layer_norm(state, p + "norm", x, 1e-6)
    if idx_to_group_img is None:
        return x
    count = len(idx_to_group_img)
    return x[:count], x[count:]


def swin_block(state, name, x, resolution, heads, window, shift):
    """X-VLM SwinTransformerBlock (Microsoft's): windows, cyclic shift, relative position bias, shift mask."""
    batch, _, channels = x.shape
    shortcut = x
    x = layer_norm(state, f"{name}.norm1", x, 1e-5).view(batch, resolution, resolution, channels)
    if shift:
        x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
    count = resolution // window
    windows = x.view(batch, count, window, count, window, channels).permute(0, 1, 3, 2, 4, 5)
    windows = windows.reshape(-1, window * window, channels)
    q, k, v = linear(state, f"{name}.attn.qkv", windows).chunk(3, dim=-1)
    table, index = state[f"{name}.attn.relative_position_bias_table"], state[f"{name}.attn.relative_position_index"]
    bias = table[index.view(-1)].view(window * window, window * window, -1).permute(2, 0, 1)
    additive = bias.unsqueeze(0)
    if shift:
        mask = state[f"{name}.attn_mask"]
        additive = (additive.view(1, 1, heads, window * window, window * window) + mask[None, :, None]).reshape(
            -1, heads, window * window, window * window).repeat(batch, 1, 1, 1)
    out = linear(state, f"{name}.attn.proj", attention(q, k, v, heads, additive))
    out = out.view(batch, count, count, window, window, channels).permute(0, 1, 3, 2, 4, 5)
    out = out.reshape(batch, resolution, resolution, channels)
    if shift:
        out = torch.roll(out, shifts=(shift, shift), dims=(1, 2))
    x = shortcut + out.reshape(batch, -1, channels)
    h = layer_norm(state, f"{name}.norm2", x, 1e-5)
    return x + linear(state, f"{name}.mlp.fc2", F.gelu(linear(state, f"{name}.mlp.fc1", h)))


def xvlm_swin(state, image, shape: SwinShape, idx_to_group_img=None, image_atts=None):
    """X-VLM SwinTransformer.forward: [avgpool CLS, grid]; with regions, their masked means as CLS."""
    p = "vision_encoder."
    x = F.conv2d(image, state[p + "patch_embed.proj.weight"], state[p + "patch_embed.proj.bias"], stride=4)
    x = layer_norm(state, p + "patch_embed.norm", x.flatten(2).transpose(1, 2), 1e-5)
    resolution = shape.image // 4
    for stage, (depth, heads) in enumerate(zip(shape.depths, shape.heads, strict=True)):
        window = min(shape.window, resolution)
        for block in range(depth):
            shift = 0 if (block % 2 == 0 or resolution <= shape.window) else window // 2
            x = swin_block(state, f"{p}layers.{stage}.blocks.{block}", x, resolution, heads, window, shift)
        if stage < len(shape.depths) - 1:
            grid = x.view(x.shape[0], resolution, resolution, -1)
            merged = torch.cat([grid[:, 0::2, 0::2], grid[:, 1::2, 0::2], grid[:, 0::2, 1::2], grid[:, 1::2, 1::2]],
                               dim=-1).view(x.shape[0], -1, 4 * x.shape[-1])
            merged = layer_norm(state, f"{p}layers.{stage}.downsample.norm", merged, 1e-5)
            x = F.linear(merged, state[f"{p}layers.{stage}.downsample.reduction.weight"])
            resolution //= 2
    x = layer_norm(state, p + "norm", x, 1e-5)
    cls = x.mean(dim=1, keepdim=True)
    if idx_to_group_img is None:
        return torch.cat([cls, x], dim=1)
    gathered = x[idx_to_group_img]
    weights = image_atts[:, 1:].unsqueeze(2)
    region_cls = (weights * gathered).sum(dim=1, keepdim=True) / weights.sum(dim=1, keepdim=True)
    return torch.cat([region_cls, gathered], dim=1), torch.cat([cls, x], dim=1)[idx_to_group_img]


def bert_layer(state, name, x, mask, encoder=None, encoder_mask=None, heads=2):
    """xbert BertLayer: post-LN self-attention, cross-attention (fusion layers), feed-forward; masks (1 - m) * -1e4."""
    additive = ((1.0 - mask.float()) * -10000.0)[:, None, None, :]
    q, k, v = (linear(state, f"{name}.attention.self.{part}", x) for part in ("query", "key", "value"))
    x = layer_norm(state, f"{name}.attention.output.LayerNorm",
                   linear(state, f"{name}.attention.output.dense", attention(q, k, v, heads, additive)) + x, LN_TEXT)
    if encoder is not None:
        cross = ((1.0 - encoder_mask.float()) * -10000.0)[:, None, None, :]
        q = linear(state, f"{name}.crossattention.self.query", x)
        k, v = (linear(state, f"{name}.crossattention.self.{part}", encoder) for part in ("key", "value"))
        x = layer_norm(state, f"{name}.crossattention.output.LayerNorm",
                       linear(state, f"{name}.crossattention.output.dense", attention(q, k, v, heads, cross)) + x,
                       LN_TEXT)
    h = F.gelu(linear(state, f"{name}.intermediate.dense", x))
    return layer_norm(state, f"{name}.output.LayerNorm", linear(state, f"{name}.output.dense", h) + x, LN_TEXT)


def xvlm_text(state, ids, mask):
    """get_text_embeds: mode 'text' (the layers below fusion_layer)."""
    p = "text_encoder.bert."
    x = (state[p + "embeddings.word_embeddings.weight"][ids] + state[p + "embeddings.token_type_embeddings.weight"][0]
         + state[p + "embeddings.position_embeddings.weight"][: ids.shape[1]])
    x = layer_norm(state, p + "embeddings.LayerNorm", x, LN_TEXT)
    for layer in range(TEXT.fusion_layer):
        x = bert_layer(state, f"{p}encoder.layer.{layer}", x, mask)
    return x


def xvlm_cross(state, image_embeds, image_atts, text_embeds, text_atts):
    """get_cross_embeds: mode 'fusion' (the layers from fusion_layer on), cross-attending to the image."""
    x = text_embeds
    for layer in range(TEXT.fusion_layer, TEXT.layers):
        x = bert_layer(state, f"text_encoder.bert.encoder.layer.{layer}", x, text_atts, image_embeds, image_atts)
    return x


def mlp(state, name, x):
    """build_mlp: Linear -> LayerNorm (eps 1e-5) -> GELU -> Linear."""
    return linear(state, f"{name}.3", F.gelu(layer_norm(state, f"{name}.1", linear(state, f"{name}.0", x), 1e-5)))


def get_image_attns(x, y, w, h, patch_size, num_patch):
    """RegionTextJsonDataset.get_image_attns."""
    x_min = min(math.floor(x / patch_size), num_patch - 1)
    x_max = max(x_min + 1, min(math.ceil((x + w) / patch_size), num_patch))
    y_min = min(math.floor(y / patch_size), num_patch - 1)
    y_max = max(y_min + 1, min(math.ceil((y + h) / patch_size), num_patch))
    atts = [0] * (1 + num_patch ** 2)
    atts[0] = 1
    for j in range(x_min, x_max):
        for i in range(y_min, y_max):
            atts[num_patch * i + j + 1] = 1
    return atts


def giou_pairs(boxes1, boxes2):
    """box_ops.generalized_box_iou's diagonal."""
    area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])  # noqa: E731
    inter = (torch.min(boxes1[:, 2:], boxes2[:, 2:]) - torch.max(boxes1[:, :2], boxes2[:, :2])).clamp(min=0).prod(1)
    union = area(boxes1) + area(boxes2) - inter
    hull = (torch.max(boxes1[:, 2:], boxes2[:, 2:]) - torch.min(boxes1[:, :2], boxes2[:, :2])).clamp(min=0).prod(1)
    return inter / union - (hull - union) / hull


def to_xyxy(b):
    return torch.stack([b[:, 0] - b[:, 2] / 2, b[:, 1] - b[:, 3] / 2, b[:, 0] + b[:, 2] / 2, b[:, 1] + b[:, 3] / 2], 1)


# --- the comparison ---------------------------------------------------------------------------------------------
TOWERS = {
    "vit": (ViTShape(image=32, patch=8, width=64, depth=3),
            {"vision": "vit_tiny_patch16_224", "image_size": 32, "local_attn_depth": 2,
             "vision_overrides": {"embed_dim": 64, "depth": 3, "num_heads": 2, "patch_size": 8}}),
    "swin": (SwinShape(image=64, embed=16, depths=(2, 2), heads=(1, 2), window=4),
             {"vision": "swin_tiny_patch4_window7_224", "image_size": 64,
              "vision_overrides": {"embed_dim": 16, "depths": [2, 2], "num_heads": [1, 2], "window_size": 4}}),
}
# xywh boxes in pixels of the image (X-VLM's target format before normalising), whole-image captions first
BOXES = {"vit": [(0, 0, 32, 32), (3.0, 5.0, 14.0, 10.0), (16.0, 16.0, 16.0, 8.0), (0, 0, 32, 32), (9.5, 1.0, 2.5, 29)],
         "swin": [(0, 0, 64, 64), (10.0, 3.0, 20.0, 17.0), (40.0, 50.0, 1.0, 14.0), (0, 0, 64, 64), (33, 30, 20, 6)]}
IDX_TO_GROUP_IMG = torch.tensor([0, 0, 0, 1, 1])
IS_IMAGE = torch.tensor([1, 0, 0, 1, 0])
TEXTS = ["two shapes on grey", "red circle", "small blue square", "a triangle", "green bar"]


@pytest.mark.parametrize("tower", ["vit", "swin"])
def test_our_x_vlm_computes_what_x_vlms_definitions_compute(tower):
    shape, overrides = TOWERS[tower]
    released = released_state(TEXT, shape, seed=3)
    released["temp"] = torch.tensor(0.05)
    config = from_mapping(ModelConfig, {**TINY_MODEL, **overrides, "itm_head": "mlp", "embed_dim": 32})
    model, tokenizer = build_backbone(config)
    ours, report = import_xvlm(released)
    model_state = {name: value for name, value in from_albef_state_dict(ours)[0].items()
                   if not name.startswith("objectives.")}
    model.load_state_dict(model_state, strict=True)
    head = BoxHead(TEXT.hidden)
    head.load_state_dict({name[len("objectives.box.head."):]: value for name, value in ours.items()
                          if name.startswith("objectives.box.head.")})
    model.eval(), head.eval()

    torch.manual_seed(4)
    size = shape.image
    images = torch.randn(2, 3, size, size)
    tokens = tokenizer(TEXTS)
    ids, text_atts = tokens["input_ids"], tokens["attention_mask"]
    boxes_xywh = torch.tensor(BOXES[tower], dtype=torch.float32)
    boxes = torch.cat([boxes_xywh[:, :2], boxes_xywh[:, :2] + boxes_xywh[:, 2:]], dim=1)
    patch = shape.patch if tower == "vit" else 4 * 2 ** (len(shape.depths) - 1)  # a Swin's last grid cell
    grid = size // patch
    # X-VLM's region masks; a whole-image caption attends everywhere
    image_atts = torch.tensor([[1] * (1 + grid * grid) if is_image else get_image_attns(*box.tolist(), patch, grid)
                               for box, is_image in zip(boxes_xywh, IS_IMAGE.tolist(), strict=True)],
                              dtype=torch.float32)
    target = torch.stack([(boxes_xywh[:, 0] + boxes_xywh[:, 2] / 2) / size, (boxes_xywh[:, 1] + boxes_xywh[:, 3] / 2)
                          / size, boxes_xywh[:, 2] / size, boxes_xywh[:, 3] / size], dim=1)

    with torch.no_grad():
        # reference (X-VLM's model in eval mode, one process)
        if tower == "vit":
            region_embeds, full = xvlm_vit(released, images, 2, 3, 2, IDX_TO_GROUP_IMG, image_atts)
            full = full[IDX_TO_GROUP_IMG]  # get_vision_embeds gathers the full-attention embeds per region
            whole = xvlm_vit(released, images, 2, 3, 2)
        else:
            region_embeds, full = xvlm_swin(released, images, shape, IDX_TO_GROUP_IMG, image_atts)
            whole = xvlm_swin(released, images, shape)
        text_embeds = xvlm_text(released, ids, text_atts)
        feat = lambda name, x: F.normalize(linear(released, name, x[:, 0]), dim=-1)  # noqa: E731
        region_feat, text_feat = feat("vision_proj", region_embeds), feat("text_proj", text_embeds)
        sims = region_feat @ text_feat.T / released["temp"]
        labels = torch.arange(5)
        itc = (F.cross_entropy(sims, labels) + F.cross_entropy(sims.T, labels)) / 2
        negative_region, negative_text = torch.tensor([2, 0, 4, 1, 3]), torch.tensor([1, 3, 0, 4, 2])
        cross_pos = xvlm_cross(released, region_embeds, image_atts, text_embeds, text_atts)[:, 0]
        cross_neg = xvlm_cross(released, torch.cat([region_embeds[negative_region], region_embeds]),
                               torch.cat([image_atts[negative_region], image_atts]),
                               torch.cat([text_embeds, text_embeds[negative_text]]),
                               torch.cat([text_atts, text_atts[negative_text]]))[:, 0]
        itm_logits = mlp(released, "itm_head", torch.cat([cross_pos, cross_neg]))
        coords = mlp(released, "bbox_head", xvlm_cross(released, full, torch.ones(full.shape[:2]), text_embeds,
                                                        text_atts)[:, 0]).sigmoid()
        weight = 1 - IS_IMAGE.float()
        l1 = (F.l1_loss(coords, target, reduction="none") * weight[:, None]).sum() / weight.sum()
        giou = ((1 - giou_pairs(to_xyxy(coords), to_xyxy(target))) * weight).sum() / weight.sum()
        whole_sims = feat("vision_proj", whole) @ feat("text_proj", text_embeds[[0, 3]]).T / released["temp"]

        # ours
        regions = {"image": images, "input_ids": ids, "attention_mask": text_atts, "image_index": IDX_TO_GROUP_IMG,
                   "boxes": boxes, "is_image": IS_IMAGE.bool()}
        encoded = encode_region_batch(model, regions)
        our_sims = encoded.region_feat @ encoded.text_feat.T / model.temp
        our_itc = contrastive_loss_in_batch(encoded.region_feat, encoded.text_feat, model.temp)
        our_logits = region_itm_logits(model, encoded, negative_region, negative_text)
        our_coords = predict_region_boxes(model, head, encoded)
        our_box = box_losses(our_coords, encoded.target, ~encoded.is_image)
        image_only = model.encode(images, ids[[0, 3]], text_atts[[0, 3]])
        our_whole_sims = image_only.image_feat @ image_only.text_feat.T / model.temp

    close = dict(atol=1e-5, rtol=1e-5)
    assert torch.equal(encoded.region_mask.float(), image_atts)
    torch.testing.assert_close(encoded.region_tokens, region_embeds, **close)
    torch.testing.assert_close(encoded.region_feat, region_feat, **close)
    torch.testing.assert_close(our_sims, sims, **close)
    torch.testing.assert_close(our_itc, itc, **close)
    torch.testing.assert_close(our_logits, itm_logits, **close)
    torch.testing.assert_close(encoded.target, target, **close)
    torch.testing.assert_close(our_coords, coords, **close)
    torch.testing.assert_close(our_box["l1"], l1, **close)
    torch.testing.assert_close(our_box["giou"], giou, **close)
    torch.testing.assert_close(our_whole_sims, whole_sims, **close)
    assert not report.unplaced
