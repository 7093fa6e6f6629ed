"""ViCHA's visual-concept path: a small BERT that reads each image's concept words, and the tokens it adds to the ViT.

ViCHA (reference/methods.md section 2) gives the IMAGE encoder, not the caption, a handful of nouns chosen
per image by an image-text model (``kwords``). The words of one image are joined with spaces and
tokenised as captions are (``[CLS] w1 w2 ...``); a 2-layer BERT (ViCHA's ``kw_encoder``, initialised from
the text encoder's embeddings and first layers) encodes them, a linear map (``kw_proj``) takes every
token state to the ViT width, and those tokens are appended to the ViT sequence after the position
embedding, so every block sees ``[CLS, patches, concept tokens]`` and the fusion layers cross-attend to
all of them (padding included, as ViCHA: its image attention mask is all ones)::

    encoder = build_concept_encoder(bert_config, layers=2, vision_width=768)
    copy_text_layers(encoder, model.text_encoder)         # ViCHA's initialisation, after BERT weights load
    tokens = encoder(concept_ids, concept_mask)             # [B, E, 768]: ViT extra tokens
    out = model.visual_encoder.encode(images, extra_tokens=tokens)

``ConceptBatch`` is the loader-side half (``CaptionsAndConcepts`` for pretraining batches): it turns
``json.concepts`` of every sample into ``concept_ids`` / ``concept_mask``, drawing
``int(sample_fraction * len(concepts))`` of them with replacement in training (ViCHA's ``randkw_p``: 4 of
15) and taking all of them in evaluation. NLVR2 samples carry two concept
lists, one per image (``concepts`` as ``[list, list]``, ViCHA's ``kwords1``/``kwords2``).

The encoder is one momentum-copyable tower of the backbone (``concept_encoder``, saved as
``concept_encoder.*`` and ``concept_encoder_m.*``), so the momentum image tokens carry momentum concepts.
"""

from __future__ import annotations

import copy
import random
import zlib
from collections.abc import Sequence

import torch
from torch import nn
from transformers import BertConfig

from pretrain.models.text import FusionBert
from pretrain.schema import ConceptConfig
from pretrain.text.batch import TokenizeBatch
from pretrain.text.tokenizer import TextTokenizer


class ConceptEncoder(nn.Module):
    """Concept words -> ViT extra tokens: ``text`` (a BERT without cross-attention) then ``proj`` per token."""

    def __init__(self, text: FusionBert, vision_width: int):
        super().__init__()
        self.text = text
        self.proj = nn.Linear(text.hidden_size, vision_width)

    @property
    def layers(self) -> int:
        return self.text.config.num_hidden_layers

    def forward(self, concept_ids: torch.Tensor, concept_mask: torch.Tensor) -> torch.Tensor:
        """``[B, E]`` ids and mask -> ``[B, E, vision_width]`` tokens, one per concept token (padding too)."""
        return self.proj(self.text.encode_text(concept_ids, concept_mask))

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        self.text.set_grad_checkpointing(enabled)


def build_concept_encoder(bert_config: BertConfig, layers: int, vision_width: int) -> ConceptEncoder:
    """A randomly initialised concept encoder: ``bert_config`` cut to ``layers`` plain BERT layers."""
    if layers < 1:
        raise ValueError(f"a concept encoder needs at least one layer, got {layers}")
    config = copy.deepcopy(bert_config)
    config.num_hidden_layers = layers
    # fusion_layer == layers: every layer is text-only, as ViCHA's kw_encoder in mode 'text'.
    text = FusionBert(config, fusion_layer=layers, encoder_width=vision_width, with_mlm_head=False)
    return ConceptEncoder(text, vision_width)


@torch.no_grad()
def copy_text_layers(encoder: ConceptEncoder, text_encoder: FusionBert) -> None:
    """ViCHA's initialisation: the concept encoder's embeddings and layers from the text encoder's first ones.

    ViCHA loads both from the same BERT checkpoint; copying from the text encoder after its weights are
    loaded gives the same values, and works as well when the text encoder starts from random weights.
    """
    if encoder.layers > text_encoder.fusion_layer:
        raise ValueError(f"the concept encoder has {encoder.layers} layers but the text encoder only "
                         f"{text_encoder.fusion_layer} text-only layers to copy them from")
    target, source = encoder.text.bert, text_encoder.bert
    target.embeddings.load_state_dict(source.embeddings.state_dict())
    for index in range(encoder.layers):
        target.encoder.layer[index].load_state_dict(source.encoder.layer[index].state_dict())


def concept_lists(meta: dict, key: str, images: int = 1) -> list[list[str]]:
    """The concept words of one sample, one list per image: ``json.concepts`` as ``[str]`` or ``[[str], [str]]``."""
    concepts = meta.get("concepts")
    if concepts is None:
        raise KeyError(key)
    nested = bool(concepts) and all(isinstance(item, list) for item in concepts)
    lists = concepts if nested else [concepts]
    if len(lists) != images or not all(isinstance(word, str) for words in lists for word in words):
        wanted = "a list of words" if images == 1 else f"{images} lists of words, one per image"
        raise ValueError(f"sample {key!r}: json.concepts must be {wanted}, got {concepts!r}")
    return [list(words) for words in lists]


def image_digest(image: torch.Tensor) -> int:
    """A CRC of a coarse subsample of an image's pixels: cheap, and the same whenever the loader gives the same
    augmented image."""
    return zlib.crc32(image[..., ::8, ::8].detach().float().cpu().numpy().tobytes())


class ConceptBatch:
    """Loader-side: ``concept_ids`` / ``concept_mask`` (``[B * images, E]``) from every sample's ``json.concepts``.

    Draws in training are seeded by the sample key and a digest of its augmented image, which the loader
    reproduces exactly when a run resumes; so a resumed run sees the same concepts as the uninterrupted one,
    and another epoch's crop of the same image draws anew.
    """

    def __init__(self, tokenizer: TextTokenizer, config: ConceptConfig, train: bool, images: int | None = None):
        self.tokenizer = TextTokenizer(tokenizer.tokenizer, max_length=config.max_length,
                                       trailing_sep=tokenizer.trailing_sep)
        self.config, self.train, self.images = config, train, images

    def texts(self, keys: Sequence[str], metas: Sequence[dict], seeds: Sequence[int] | None = None) -> list[str]:
        """One concept text per image, in sample order (both images of a sample next to each other); ``seeds``
        (one per sample) vary the training draws."""
        return self._texts(keys, metas, seeds, self.images or 1)

    def _texts(self, keys, metas, seeds, images: int) -> list[str]:
        texts = []
        seeds = seeds if seeds is not None else [0] * len(keys)
        for key, meta, seed in zip(keys, metas, seeds, strict=True):
            try:
                lists = concept_lists(meta, key, images)
            except KeyError:
                raise ValueError(
                    f"sample {key!r} has no json.concepts, but this model reads visual concepts "
                    "(model.concepts.layers > 0): add them with `python -m data_shards concepts` and rebuild "
                    "the shards, or use a checkpoint without concepts") from None
            for index, words in enumerate(lists):
                if self.train and self.config.sample_fraction is not None and words:
                    draw = random.Random(zlib.crc32(f"{key}:{index}:{seed}".encode()))
                    words = draw.choices(words, k=max(1, int(self.config.sample_fraction * len(words))))
                texts.append(self.config.separator.join(words))
        return texts

    def __call__(self, batch: dict) -> dict:
        seeds = [image_digest(image) for image in batch["image"]] if self.train and "image" in batch else None
        # Two-image samples (NLVR2: [B, 2, 3, H, W]) carry one concept list per image.
        images = self.images or (batch["image"].shape[1] if "image" in batch and batch["image"].ndim == 5 else 1)
        tokens = self.tokenizer(self._texts(batch["__key__"], batch["meta"], seeds, images))
        return {**batch, "concept_ids": tokens["input_ids"], "concept_mask": tokens["attention_mask"]}


class CaptionsAndConcepts:
    """Pretraining's loader-side adapter for a backbone that reads concepts: captions as ``TokenizeBatch`` gives
    them, then ``ConceptBatch``'s concept tokens (training draws)."""

    def __init__(self, tokenizer: TextTokenizer, config: ConceptConfig):
        self.captions = TokenizeBatch(tokenizer)
        self.concepts = ConceptBatch(tokenizer, config, train=True)

    def __call__(self, batch: dict) -> dict:
        return self.concepts(self.captions(batch))


class WithConcepts:
    """A fine-tuning task's batch adapter plus the concept tokens of a backbone that reads concepts: the task's
    adapter runs as it is, and ``concept_ids`` / ``concept_mask`` are added from the same collated batch."""

    def __init__(self, adapter, concepts: ConceptBatch):
        self.adapter, self.concepts = adapter, concepts

    def __call__(self, batch: dict) -> dict:
        added = self.concepts(batch)
        return {**self.adapter(batch), "concept_ids": added["concept_ids"], "concept_mask": added["concept_mask"]}
