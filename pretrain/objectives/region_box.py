"""X-VLM's box term: predict each region text's box from the whole image, with L1 + (1 - GIoU).

``Box`` (``objectives.box``, terms ``box_l1`` and ``box_giou``) owns X-VLM's ``bbox_head``
(``pretrain.objectives.box.BoxHead``: MLP with LayerNorm and GELU, sigmoid). On a step with a region batch it
runs the fusion layers on each region text attending to the WHOLE image its region comes from (every token
visible), reads the fused [CLS] with the head, and compares the predicted (cx, cy, w, h) with the region's box
normalised to the augmented image (``pretrain.objectives.region_encoding``). Image captions in the region batch
(whose box would be the whole image, [0.5, 0.5, 1, 1]) count only with ``include_whole_image`` (X-VLM's
``calc_image_bbox_loss``, off in its released configs). Both terms are summed over the counted texts and
divided by their number (``pretrain.objectives.box.box_losses``).

Fine-tuning reads the pretrained head (``finetune.grounding`` with ``options.mode: box``); it is exported as
``objectives.box.head.*`` (``pretrain.export``) and as X-VLM's ``bbox_head.*`` (``pretrain.importers.xvlm``).

Tests: ``.venv/bin/python -m pytest -q tests/pretrain/objectives/test_region.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pretrain.models.encoded import Encoded
from pretrain.objectives.base import BuildContext, StepContext
from pretrain.objectives.box import BoxHead, box_losses
from pretrain.objectives.region import RegionObjective
from pretrain.objectives.region_encoding import RegionEncoded, region_encoding


@dataclass(frozen=True)
class BoxConfig:
    """``objectives.box`` options."""

    include_whole_image: bool = False             # X-VLM calc_image_bbox_loss: also regress image captions' box


def predict_region_boxes(model, head: BoxHead, regions: RegionEncoded) -> torch.Tensor:
    """Sigmoid (cx, cy, w, h) [R, 4] from the fused [CLS] of each region text with its whole image."""
    images = regions.image_tokens[regions.image_index]
    return head(model.text_encoder.fuse(regions.text_hidden, regions.attention_mask, images)[:, 0])


class Box(RegionObjective):
    """X-VLM's box head on region texts; terms ``box_l1`` and ``box_giou``."""

    Config = BoxConfig
    terms = ("box_l1", "box_giou")

    def __init__(self, config: BoxConfig, build: BuildContext):
        super().__init__(config, build)
        self.head = BoxHead(build.model.text_encoder.hidden_size)

    def forward(self, encoded: Encoded, encoded_m: Encoded | None, batch: dict,
                step: StepContext) -> dict[str, torch.Tensor]:
        regions = region_encoding(step, batch)
        if regions is None:
            return {}
        predicted = predict_region_boxes(step.model, self.head, regions).float()
        counted = torch.ones_like(regions.is_image) if self.config.include_whole_image else ~regions.is_image
        losses = box_losses(predicted, regions.target.to(predicted.dtype), counted)
        return {"box_l1": losses["l1"], "box_giou": losses["giou"]}
