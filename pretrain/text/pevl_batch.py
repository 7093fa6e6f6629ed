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
- VCR's question, right answer and right rationale (``--format vcr``), each object reference written
  ``name @@ p p p p ##`` (``reference_text``), as PEVL's VCR pretraining data.
- GQA's question (``--format gqa``) goes by its regions' spans, as the first case.
- nothing of the above: the caption as it is.

Cleaning is ALBEF's with the markers kept (``clean_caption(..., keep=tokenizer.markers)``), with PEVL's word
limit of 200 (markers count as words); the token limit is the tokenizer's ``max_length``.
"""

from __future__ import annotations

from pretrain.text.cleaning import clean_caption
from pretrain.text.positions import NUM_BINS, insert_positions, marker_text, quantise_box, with_position_tokens

MAX_WORDS = 200  # PEVL's pre_caption limit for pseudo-captions


class UnknownObject(KeyError):
    """A VCR text refers to an object the sample has no region for."""


def referable_objects(meta: dict) -> tuple[dict[int, dict], dict[int, str]]:
    """A VCR sample's objects by index: those in view (``regions``: ``label``, ``box``), and the names of those a
    crop removed (``cropped_out``, written by ``data_shards.boxes.transform_meta``)."""
    return ({int(region["index"]): region for region in meta.get("regions") or []},
            {int(entry["index"]): str(entry["label"]) for entry in meta.get("cropped_out") or []})


def reference_text(tokens: list, objects: dict[int, dict], width: float, height: float,
                   num_bins: int = NUM_BINS, cropped_out: dict[int, str] | None = None) -> str:
    """A VCR token list as text, each object reference ``[i, ...]`` as ``name @@ p p p p ##`` (several objects
    joined by "and", PEVL's ``pseudo_seq_gen``); ``objects`` maps an index to its region (``label``, ``box``).
    An object a crop removed (``cropped_out``: index -> name) is written by its name alone, as a caption's phrase
    whose box a crop cuts off loses its marker."""
    words = []
    for token in tokens:
        if isinstance(token, str):
            words.append(token)
            continue
        named = []
        for index in token:
            region = objects.get(int(index))
            if region is not None:
                named.append(str(region["label"]) + marker_text(quantise_box(region["box"], width, height, num_bins)))
            elif cropped_out and int(index) in cropped_out:
                named.append(cropped_out[int(index)])
            else:
                raise UnknownObject(f"object {index} of a VCR text has no region")
        words.append(" and ".join(named))
    return " ".join(words)


def pseudo_caption(text: str, meta: dict, width: float, height: float, num_bins: int = NUM_BINS) -> str:
    """The caption with position markers for the sample's boxes (see the module docstring), not yet cleaned."""
    if meta.get("answer_choices") is not None and meta.get("answer_label") is not None:
        objects, cropped_out = referable_objects(meta)
        parts = [meta["question"], meta["answer_choices"][meta["answer_label"]]]
        if meta.get("rationale_choices") and meta.get("rationale_label") is not None:
            parts.append(meta["rationale_choices"][meta["rationale_label"]])
        return " ".join(reference_text(part, objects, width, height, num_bins, cropped_out) for part in parts)
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
