"""PEVL's batch adapter: each sample's caption with its boxes written in as position tokens, then tokenised.

Runs in the loader workers, after the image transform, so boxes are in pixels of the image the model sees and
a flip has already swapped left/right in the caption and remapped the region spans::

    adapter = PositionCaptionBatch(with_position_tokens(tokenizer))
    batch = adapter(batch)     # text: cleaned pseudo-captions; input_ids / attention_mask with position ids

What a sample's ``json`` gives (``pseudo_caption``):

- ``regions`` with ``span`` (``data_shards build --format pevl``: MDETR/PEVL ``tokens_positive``): a marker
  after each region's phrase, PEVL's insertion (``pretrain.text.positions``). Regions without a span, or
  whose box a crop removed, write nothing.
- ``box`` without regions (``--format refcoco``: a referring expression and its box): the whole expression
  is the phrase, so the marker follows it, as PEVL's REC training files are written.
- nothing of the above: the caption as it is.

Cleaning is ALBEF's with the markers kept (``clean_caption(..., keep=tokenizer.markers)``), with PEVL's word
limit of 200 (markers count as words); the token limit is the tokenizer's ``max_length``.
"""

from __future__ import annotations

from pretrain.text.cleaning import clean_caption
from pretrain.text.positions import NUM_BINS, insert_positions, quantise_box, with_position_tokens

MAX_WORDS = 200  # PEVL's pre_caption limit for pseudo-captions


def pseudo_caption(text: str, meta: dict, width: float, height: float, num_bins: int = NUM_BINS) -> str:
    """The caption with position markers for the sample's boxes (see the module docstring), not yet cleaned."""
    regions = [region for region in meta.get("regions") or [] if region.get("span") is not None]
    if regions:
        spans = [region["span"] for region in regions]
        bins = [quantise_box(region["box"], width, height, num_bins) for region in regions]
        return insert_positions(text, spans, bins)
    if meta.get("box") is not None and not meta.get("regions") and text.strip():
        return insert_positions(text, [(0, len(text))], [quantise_box(meta["box"], width, height, num_bins)])
    return text


class PositionCaptionBatch:
    """batch -> batch with cleaned pseudo-captions in ``text`` plus ``input_ids`` / ``attention_mask``."""

    def __init__(self, tokenizer, max_words: int = MAX_WORDS, num_bins: int = NUM_BINS):
        if "[pos_0]" not in tokenizer.markers:
            raise ValueError("PositionCaptionBatch needs a tokenizer with PEVL's position tokens "
                             "(pretrain.text.positions.with_position_tokens)")
        self.tokenizer = tokenizer
        self.max_words = max_words
        self.num_bins = num_bins

    def __call__(self, batch: dict) -> dict:
        height, width = batch["image"].shape[-2:]
        texts = [clean_caption(pseudo_caption(text, meta, width, height, self.num_bins), self.max_words,
                               keep=self.tokenizer.markers).text
                 for text, meta in zip(batch["text"], batch["meta"], strict=True)]
        tokens = self.tokenizer(texts)
        return {**batch, "text": texts, "input_ids": tokens["input_ids"],
                "attention_mask": tokens["attention_mask"]}



def pevl_batch(tokenizer, config) -> PositionCaptionBatch:
    """The ``pevl`` recipe's adapter (``pretrain.methods``): the bins and slots of ``objectives.position_mlm``
    when the config sets them, PEVL's 512 bins from ``[unused200]`` otherwise."""
    from pretrain.objectives.position import PositionMLMConfig

    entry = (config.objectives or {}).get("position_mlm") or {}
    defaults = PositionMLMConfig()
    num_bins = int(entry.get("num_bins", defaults.num_bins))
    first_unused = int(entry.get("first_unused", defaults.first_unused))
    return PositionCaptionBatch(with_position_tokens(tokenizer, num_bins=num_bins, first_unused=first_unused),
                                num_bins=num_bins)
