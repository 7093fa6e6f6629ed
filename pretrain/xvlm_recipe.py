"""What the ``xvlm`` method (``pretrain/methods.py``) brings besides its objectives: its batch adapters and the
options of its region stream.

X-VLM pretrains on image-text batches and, with probability ``data.streams.regions.probability`` (X-VLM's
``iter_perc``, 0.5), a region batch beside each (reference/methods.md section 1)::

    data:
      streams:
        regions:
          train: [{urls: "s3://bucket/vg-regions-{000000..000399}.tar"}]   # data_shards build --format xvlm
          probability: 0.5
          batch_size: 48              # images per region batch and rank (X-VLM max_images)
          options: {texts_per_batch: 128, max_regions: 5, min_perc_in_image: 0.5}

- ``xvlm_batch``: image-text batches are cleaned and tokenised as ALBEF's, up to ``model.max_text_length``
  words (X-VLM's ``max_words`` equals its ``max_tokens``). Its MLM masks spans in the objective
  (``pretrain.objectives.span_mlm``).
- ``xvlm_region_batch``: region images come from the loader already cropped around a random region, flipped
  unless a text says left or right, with photometric RandAugment only (the stream's transform in the recipe);
  ``RegionBatch`` then picks each image's texts and the batch's ``texts_per_batch`` texts
  (``data_shards.region_sampler``), cleans and tokenises them, and hands the region objectives
  (``pretrain.objectives.region_encoding``) ``image``, ``input_ids``, ``attention_mask``, ``image_index``,
  ``boxes`` (xyxy pixels; the whole image for a caption) and ``is_image``.

Every rank's region batch has exactly ``texts_per_batch`` texts, which the gathered region ITC needs.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import torch

from data_shards.region_sampler import choose_texts, region_texts, sample_rng
from pretrain.config import from_mapping, require, require_at_least
from pretrain.schema import PretrainConfig
from pretrain.text.batch import TokenizeBatch
from pretrain.text.cleaning import clean_caption

REGION_STREAM = "regions"


@dataclass(frozen=True)
class RegionStreamOptions:
    """``data.streams.regions.options``: X-VLM's ``regions`` settings (its 4M config's values by default)."""

    texts_per_batch: int = 128                    # region texts per batch and rank (X-VLM regions.batch_size)
    max_regions: int = 5                          # texts per image, the image caption included
    min_perc_in_image: float = 0.5                # a region counts when more than this share of it is in the crop

    def __post_init__(self):
        require_at_least(self.texts_per_batch, "texts_per_batch", 1)
        require_at_least(self.max_regions, "max_regions", 1)
        require(0.0 <= self.min_perc_in_image < 1.0, "min_perc_in_image",
                f"must lie in [0, 1), got {self.min_perc_in_image}")


def xvlm_batch(tokenizer, config: PretrainConfig) -> TokenizeBatch:
    """Image-text batches: ALBEF's cleaning and ``[CLS] x`` tokenisation, up to ``max_text_length`` words."""
    return TokenizeBatch(tokenizer, max_words=config.model.max_text_length)


class RegionBatch:
    """Loader-side adapter of region batches (see the module docstring); picklable for loader workers."""

    def __init__(self, tokenizer, options: RegionStreamOptions, max_words: int):
        self.tokenizer = tokenizer
        self.options = options
        self.max_words = max_words

    def __call__(self, batch: dict) -> dict:
        texts, boxes, is_image, image_index, seeds = [], [], [], [], []
        for index, (key, meta) in enumerate(zip(batch["__key__"], batch["meta"], strict=True)):
            rng = sample_rng(key, meta)
            seeds.append(rng.getrandbits(64))
            for region in region_texts(meta, rng, max_regions=self.options.max_regions,
                                       min_perc_in_image=self.options.min_perc_in_image, key=key):
                texts.append(region.text)
                boxes.append(region.box)
                is_image.append(region.is_image)
                image_index.append(index)
        batch_rng = random.Random(int.from_bytes(hashlib.blake2b(repr(seeds).encode(), digest_size=8).digest(), "big"))
        try:
            chosen = choose_texts(self.options.texts_per_batch, len(texts), batch_rng)
        except ValueError as error:
            raise ValueError(f"region batch {batch['__key__'][:4]}...: {error}") from None
        keep = self.tokenizer.markers
        cleaned = [clean_caption(texts[index], self.max_words, keep=keep).text for index in chosen]
        tokens = self.tokenizer(cleaned)
        return {"__key__": batch["__key__"], "image": batch["image"], "text": cleaned,
                "input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"],
                "image_index": torch.tensor([image_index[index] for index in chosen], dtype=torch.long),
                "boxes": torch.tensor([boxes[index] for index in chosen], dtype=torch.float32).reshape(-1, 4),
                "is_image": torch.tensor([is_image[index] for index in chosen], dtype=torch.bool)}


def region_stream_options(config: PretrainConfig) -> RegionStreamOptions:
    """``data.streams.regions.options``, checked strictly (errors name the key)."""
    stream = config.data.streams[REGION_STREAM]
    return from_mapping(RegionStreamOptions, stream.options, f"data.streams.{REGION_STREAM}.options")


def xvlm_region_batch(tokenizer, config: PretrainConfig) -> RegionBatch:
    """The region stream's adapter, with the options of ``data.streams.regions.options``."""
    return RegionBatch(tokenizer, region_stream_options(config), max_words=config.model.max_text_length)
