"""X-VLM's region terms: the image-text ITC, ITM and MLM applied to (region, region text) pairs.

Each reads the step's region batch through ``pretrain.objectives.region_encoding`` (encoded once, shared by all
region objectives of the step) and returns nothing on steps that drew no region batch:

- ``RegionITC`` (``objectives.region_itc``, term ``region_itc``): in-batch contrastive loss between the region
  features and the region texts, negatives gathered from every rank, no momentum or queue, the backbone's
  temperature (clamped as ITC clamps it) — X-VLM's ``get_contrastive_loss`` on the region batch.
- ``RegionITM`` (``objectives.region_itm``, term ``region_itm``): one negative region per text and one negative
  text per region, drawn in proportion to the softmax of the region similarities (the diagonal excluded); the
  text's fusion layers cross-attend to the region's sequence only where its mask allows (a negative region
  brings its own mask); cross-entropy of the ITM head over the [positives, (text, negative region), (negative
  text, region)] batch, as ``pretrain.objectives.itm``.
- ``RegionMLM`` (``objectives.region_mlm``, term ``region_mlm``): X-VLM's span masking of the region texts
  (``pretrain.objectives.span_mlm``), the fusion layers reading the region through its mask.

The box head over the same batch is ``pretrain.objectives.region_box``.

Tests: ``.venv/bin/python -m pytest -q tests/pretrain/objectives/test_region.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from pretrain.config import require
from pretrain.models.encoded import Encoded
from pretrain.objectives.base import BuildContext, Objective, StepContext
from pretrain.objectives.itc import contrastive_loss_in_batch
from pretrain.objectives.itm import diagonal_exclusion, itm_labels, itm_loss, sample_hard_negatives
from pretrain.objectives.region_encoding import STREAM, RegionEncoded, region_encoding
from pretrain.objectives.span_mlm import MaskingVocabulary, SpanMLMConfig, masked_lm_loss, span_mask_batch


@dataclass(frozen=True)
class RegionITCConfig:
    """``objectives.region_itc`` options: the temperature's clamp, as ``objectives.itc``."""

    temp_min: float = 0.001
    temp_max: float = 0.5

    def __post_init__(self):
        require(0 < self.temp_min <= self.temp_max, "temp_min",
                f"must be positive and at most temp_max ({self.temp_max}), got {self.temp_min}")


class RegionObjective(Objective):
    """Base of the objectives that read X-VLM's region stream."""

    streams: ClassVar[tuple[str, ...]] = (STREAM,)    # the data streams it reads (checked against data.streams)


def clamped_temperature(step: StepContext, low: float, high: float) -> torch.Tensor:
    """The backbone's temperature within [low, high], clamped in place as X-VLM does at each forward, unless a
    term earlier in this step already used it (ITC): changing it in place would break that term's backward, so
    then only the value used here is clamped."""
    temp = step.model.temp
    if bool(((temp < low) | (temp > high)).any()):
        if "itc_similarity" in step.shared:
            return temp.clamp(low, high).float()
        step.model.clamp_temperature(low, high)
    return step.model.temp.float()


def region_similarity(encoded: RegionEncoded, temp: torch.Tensor) -> torch.Tensor:
    """[R, R] local region (rows) vs region text (columns) similarities over the temperature, fp32, no graph."""
    with torch.no_grad():
        return encoded.region_feat.float() @ encoded.text_feat.float().T / temp.float()


class RegionITC(RegionObjective):
    """In-batch contrastive loss on (region, region text) pairs; term ``region_itc``. Leaves its similarities in
    ``step.shared["region_itc_similarity"]`` for ``RegionITM``."""

    Config = RegionITCConfig
    terms = ("region_itc",)

    def forward(self, encoded: Encoded, encoded_m: Encoded | None, batch: dict,
                step: StepContext) -> dict[str, torch.Tensor]:
        regions = region_encoding(step, batch)
        if regions is None:
            return {}
        temp = clamped_temperature(step, self.config.temp_min, self.config.temp_max)
        step.shared["region_itc_similarity"] = region_similarity(regions, temp)
        return {"region_itc": contrastive_loss_in_batch(regions.region_feat, regions.text_feat, temp)}


def region_itm_logits(model, regions: RegionEncoded, negative_region: torch.Tensor,
                      negative_text: torch.Tensor) -> torch.Tensor:
    """ITM logits [3R, 2] of the positives, the (text, negative region) and the (negative text, region) pairs."""
    text, mask = regions.text_hidden, regions.attention_mask
    tokens, region_mask = regions.region_tokens, regions.region_mask
    texts = torch.cat([text, text, text[negative_text]])
    masks = torch.cat([mask, mask, mask[negative_text]])
    images = torch.cat([tokens, tokens[negative_region], tokens])
    image_masks = torch.cat([region_mask, region_mask[negative_region], region_mask])
    return model.itm_head(model.text_encoder.fuse(texts, masks, images, image_masks)[:, 0])


class RegionITM(RegionObjective):
    """Matching of region texts with regions, hard negatives from the region similarities; term ``region_itm``."""

    terms = ("region_itm",)

    def forward(self, encoded: Encoded, encoded_m: Encoded | None, batch: dict,
                step: StepContext) -> dict[str, torch.Tensor]:
        regions = region_encoding(step, batch)
        if regions is None:
            return {}
        similarity = step.shared.get("region_itc_similarity")
        if similarity is None:
            similarity = region_similarity(regions, step.model.temp)
        count = similarity.shape[0]
        negative_region, negative_text = sample_hard_negatives(similarity, similarity.T,
                                                               diagonal_exclusion(count, similarity.device))
        logits = region_itm_logits(step.model, regions, negative_region, negative_text)
        return {"region_itm": itm_loss(logits.float(), itm_labels(count, logits.device))}


class RegionMLM(RegionObjective):
    """X-VLM's span-masked MLM on region texts, the fusion layers reading their region; term ``region_mlm``."""

    Config = SpanMLMConfig
    terms = ("region_mlm",)

    def __init__(self, config: SpanMLMConfig, build: BuildContext):
        super().__init__(config, build)
        self.vocabulary = MaskingVocabulary.of(build.tokenizer)

    def forward(self, encoded: Encoded, encoded_m: Encoded | None, batch: dict,
                step: StepContext) -> dict[str, torch.Tensor]:
        regions = region_encoding(step, batch)
        if regions is None:
            return {}
        masked_ids, labels = span_mask_batch(regions.input_ids, regions.attention_mask, self.config, self.vocabulary)
        return {"region_mlm": masked_lm_loss(step.model.text_encoder, masked_ids, regions.attention_mask, labels,
                                             regions.region_tokens, regions.region_mask)}
