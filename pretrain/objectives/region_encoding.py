"""One encoding of a region batch that every region objective of a step reads (X-VLM's region step).

A region batch (``batch["streams"]["regions"]``, made by ``pretrain.xvlm_recipe.RegionBatch``) holds images and,
for each region text, the image it belongs to (``image_index``, X-VLM's ``idx_to_group_img``) and its box in
pixels of that image (the whole image for an image caption)::

    {"image": [I, 3, S, S], "input_ids": [R, T], "attention_mask": [R, T], "image_index": [R] long,
     "boxes": [R, 4] xyxy pixels, "is_image": [R] bool}

``encode_region_batch`` turns it into a ``RegionEncoded`` record, each image encoded once for all its regions:

- the box becomes a mask over the patch grid (``pretrain.models.regions.box_patch_mask``, X-VLM's floor/ceil
  rule) plus the always-visible [CLS] (``region_attention_mask``);
- ``visual_encoder.encode_regions`` gives the whole images' tokens and one token sequence per region: for a
  ViT, a copy of its image's sequence runs the last ``model.local_attn_depth`` blocks with self-attention
  restricted to the mask and its [CLS] is the region feature; for Swin (``pretrain.models.swin``), the region
  [CLS] is the mean of the in-box grid tokens;
- the region's text cross-attends to its sequence where the mask allows (X-VLM's ``image_atts``), in ITM and MLM;
- the box head reads the fused [CLS] of the WHOLE image's tokens with the region text.

``region_encoding(step, batch)`` makes the record once per step and leaves it in ``step.shared`` for the other
region objectives of the same step; it is None on steps that drew no region batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pretrain.models.regions import box_patch_mask, region_attention_mask
from pretrain.objectives.box import xyxy_to_cxcywh

STREAM = "regions"                                # the name of X-VLM's region stream (data.streams.regions)
REGION_FIELDS = ("image", "input_ids", "attention_mask", "image_index", "boxes", "is_image")


@dataclass
class RegionEncoded:
    """Both towers' outputs for one region batch (I images, R region texts)."""

    image_tokens: torch.Tensor                    # [I, S, D] whole images, after the final norm
    region_tokens: torch.Tensor                   # [R, S, D] each region's sequence; [:, 0] is the region feature
    region_mask: torch.Tensor                     # [R, S] bool: what the region's text may cross-attend to
    region_feat: torch.Tensor                     # [R, E] normalised projection of the region feature
    text_hidden: torch.Tensor                     # [R, T, H] text-only layers of the region texts
    text_feat: torch.Tensor                       # [R, E] normalised projection of the text [CLS]
    attention_mask: torch.Tensor                  # [R, T]
    input_ids: torch.Tensor                       # [R, T]
    image_index: torch.Tensor                     # [R] long
    is_image: torch.Tensor                        # [R] bool: the text is the image's caption, its box the image
    target: torch.Tensor                          # [R, 4] (cx, cy, w, h) of the box over the image size


def region_batch(batch: dict) -> dict | None:
    """This step's region batch, or None when the step drew none; a malformed one is an error naming its fields."""
    found = (batch.get("streams") or {}).get(STREAM)
    if found is None:
        return None
    missing = [name for name in REGION_FIELDS if name not in found]
    if missing:
        raise ValueError(f"the {STREAM!r} stream's batch lacks {missing}; it must come from the xvlm method's "
                         "region batch adapter (pretrain.xvlm_recipe.RegionBatch)")
    return found


def region_masks(visual_encoder, boxes: torch.Tensor) -> torch.Tensor:
    """Bool [R, 1 + N]: [CLS] and the grid cells each xyxy pixel box covers, in the encoder's token layout."""
    patches = box_patch_mask(boxes, visual_encoder.grid_size, visual_encoder.patch_size)
    return region_attention_mask(patches.to(boxes.device))


def encode_region_batch(model, regions: dict) -> RegionEncoded:
    """Encode a region batch with the backbone ``model`` (see the module docstring)."""
    visual_encoder = model.visual_encoder
    images = regions["image"].to(next(visual_encoder.parameters()).dtype)
    boxes = regions["boxes"].float()
    mask = region_masks(visual_encoder, boxes)
    output = visual_encoder.encode_regions(images, regions["image_index"], mask, masked_blocks=model.local_attn_depth)
    region_tokens = output.region_tokens
    text_hidden = model.text_encoder.encode_text(regions["input_ids"], regions["attention_mask"])
    height, width = images.shape[-2:]
    scale = torch.tensor([width, height, width, height], dtype=torch.float32, device=boxes.device)
    return RegionEncoded(
        image_tokens=output.tokens, region_tokens=region_tokens, region_mask=mask,
        region_feat=F.normalize(model.vision_proj(region_tokens[:, 0]), dim=-1),
        text_hidden=text_hidden, text_feat=F.normalize(model.text_proj(text_hidden[:, 0]), dim=-1),
        attention_mask=regions["attention_mask"], input_ids=regions["input_ids"],
        image_index=regions["image_index"], is_image=regions["is_image"].bool(),
        target=xyxy_to_cxcywh(boxes) / scale)


def region_encoding(step, batch: dict) -> RegionEncoded | None:
    """The step's ``RegionEncoded`` (made by the first region objective that asks, kept in ``step.shared``)."""
    regions = region_batch(batch)
    if regions is None:
        return None
    if "region_encoding" not in step.shared:
        step.shared["region_encoding"] = encode_region_batch(step.model, regions)
    return step.shared["region_encoding"]
