"""X-VLM's masked language modelling: whole-word and span masking of a capped number of tokens.

``span_mask`` follows X-VLM's ``TextMaskingGenerator`` (reference/methods.md section 1) on one text's token ids:

- ``n = min(max_masks, max(1, round(length * probability)))`` tokens are to be predicted, ``length`` counting
  [CLS] (which is never masked) and Python's ``round`` (halves to even) as X-VLM;
- candidate positions (1..length-1) are visited in a random order; at each, with ``span_probability`` a span
  of 2..``max_span`` tokens starts there, otherwise one token; with ``whole_word`` the span grows to whole
  words (left over ``##`` word pieces it starts on, right over the ``##`` pieces that follow it); positions
  are taken until a span runs past the text;
- when more than ``n`` positions were taken, a random ``n`` of them are kept;
- each kept position becomes [MASK] with probability 0.8, else a random id (uniform over the vocabulary,
  special tokens included) with probability 0.5, else stays.

``span_mask_batch`` applies it to every row of a padded batch and returns ``(masked_ids, labels)`` with -100
where nothing is predicted, the same contract as ``pretrain.objectives.mlm.mask_tokens``. The draws come from
a ``random.Random`` seeded from torch's global generator, so a resumed run (which restores that generator)
masks as the interrupted one would have.

The loss is cross-entropy over the masked positions only; the MLM head runs on those positions alone (X-VLM's
``masked_pos``), not on every token. No momentum distillation (X-VLM has none).

``SpanMLM`` is the objective (``objectives.span_mlm``, term ``mlm``); ``pretrain.objectives.region`` uses the
same masking for region texts.

Tests: ``.venv/bin/python -m pytest -q tests/pretrain/objectives/test_span_mlm.py``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pretrain.config import require, require_at_least
from pretrain.models.encoded import Encoded
from pretrain.objectives.base import BuildContext, Objective, StepContext
from pretrain.objectives.mlm import IGNORE_INDEX


@dataclass(frozen=True)
class SpanMLMConfig:
    """``objectives.span_mlm`` (and ``region_mlm``) options; the defaults are X-VLM's 4M pretraining."""

    probability: float = 0.25                     # mask_prob: share of the text's tokens to predict
    max_masks: int = 8                            # at most this many per text (X-VLM: 8 for 4M, 6 for 16M)
    span_probability: float = 0.2                 # skipgram_prb: a visited position starts a span
    max_span: int = 3                             # skipgram_size: spans have 2..max_span tokens
    whole_word: bool = True                       # mask_whole_word: spans cover whole words

    def __post_init__(self):
        require(0.0 < self.probability <= 1.0, "probability", f"must lie in (0, 1], got {self.probability}")
        require_at_least(self.max_masks, "max_masks", 1)
        require(0.0 <= self.span_probability <= 1.0, "span_probability",
                f"must lie in [0, 1], got {self.span_probability}")
        require_at_least(self.max_span, "max_span", 2)


@dataclass(frozen=True)
class MaskingVocabulary:
    """What masking needs to know of the tokenizer."""

    size: int                                     # random replacement ids are drawn from 0..size-1
    mask_id: int
    continuation: frozenset[int]                  # ids of ``##`` word pieces (they continue a word)
    protected: frozenset[int] = frozenset()       # ids never masked besides [CLS] (e.g. a trailing [SEP])

    @classmethod
    def of(cls, tokenizer) -> MaskingVocabulary:
        """From a ``pretrain.text`` tokenizer (its Hugging Face vocabulary, extra tokens included)."""
        pieces = tokenizer.tokenizer.get_vocab()
        continuation = frozenset(index for token, index in pieces.items() if token.startswith("##"))
        protected = frozenset({tokenizer.sep_token_id}) if getattr(tokenizer, "trailing_sep", False) else frozenset()
        return cls(tokenizer.vocab_size, tokenizer.mask_token_id, continuation, protected)


def span_mask(ids: list[int], config: SpanMLMConfig, vocabulary: MaskingVocabulary,
              rng: random.Random) -> tuple[list[int], list[int]]:
    """One text ``ids`` ([CLS] first, no padding) -> (masked ids, masked positions in the order drawn)."""
    length = len(ids)
    wanted = min(config.max_masks, max(1, int(round(length * config.probability))))
    candidates = [position for position in range(1, length) if ids[position] not in vocabulary.protected]
    if not candidates:
        return list(ids), []
    rng.shuffle(candidates)
    last = max(candidates)
    continuation = vocabulary.continuation
    chosen: set[int] = set()
    for position in candidates:
        if len(chosen) >= wanted:
            break
        if position in chosen:
            continue
        span = rng.randint(2, config.max_span) if (config.max_span >= 2 and config.span_probability > 0
                                                    and rng.random() < config.span_probability) else 1
        start, end = position, position + span
        if config.whole_word:
            while start >= 0 and ids[start] in continuation:
                start -= 1
            while end < length and ids[end] in continuation:
                end += 1
        for index in range(start, end):
            if 0 < index <= last and ids[index] not in vocabulary.protected:
                chosen.add(index)
            else:
                break
    positions = list(chosen)
    if len(positions) > wanted:
        rng.shuffle(positions)
        positions = positions[:wanted]
    masked = list(ids)
    for position in positions:
        if rng.random() < 0.8:
            masked[position] = vocabulary.mask_id
        elif rng.random() < 0.5:
            masked[position] = rng.randint(0, vocabulary.size - 1)
    return masked, positions


def span_mask_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor, config: SpanMLMConfig,
                    vocabulary: MaskingVocabulary, rng: random.Random | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``span_mask`` on every row of ``input_ids`` [B, T] (``attention_mask`` marks each row's tokens).

    Returns ``(masked_ids, labels)`` on the input's device; ``labels`` hold the original id at masked
    positions and -100 elsewhere. ``rng`` None draws a seed from torch's global generator.
    """
    if rng is None:
        rng = random.Random(int(torch.randint(2**62, (1,)).item()))
    rows = input_ids.tolist()
    lengths = attention_mask.sum(dim=1).tolist()
    masked_rows, labels = [], torch.full_like(input_ids, IGNORE_INDEX, device="cpu")
    for row_index, (row, length) in enumerate(zip(rows, lengths, strict=True)):
        masked, positions = span_mask(row[: int(length)], config, vocabulary, rng)
        masked_rows.append(masked + row[int(length):])
        for position in positions:
            labels[row_index, position] = row[position]
    masked_ids = torch.tensor(masked_rows, dtype=input_ids.dtype)
    return masked_ids.to(input_ids.device), labels.to(input_ids.device)


def masked_lm_loss(text_encoder, masked_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                   image_tokens: torch.Tensor, image_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy at the masked positions of ``masked_ids`` read with every text layer, the fusion layers
    attending to ``image_tokens`` (where ``image_mask`` allows). The MLM head runs on those positions only. A
    batch without a masked position gives a zero that stays in the graph."""
    hidden = text_encoder(masked_ids, attention_mask, image_tokens, image_mask)
    scored = labels != IGNORE_INDEX
    if not bool(scored.any()):
        return hidden.sum() * 0.0
    logits = text_encoder.mlm_logits(hidden[scored]).float()
    return F.cross_entropy(logits, labels[scored])


class SpanMLM(Objective):
    """X-VLM's MLM on the image-text batch: span masking, the fusion layers reading the image; term ``mlm``."""

    Config = SpanMLMConfig
    terms = ("mlm",)

    def __init__(self, config: SpanMLMConfig, build: BuildContext):
        super().__init__(config, build)
        self.vocabulary = MaskingVocabulary.of(build.tokenizer)

    def forward(self, encoded: Encoded, encoded_m: Encoded | None, batch: dict,
                step: StepContext) -> dict[str, torch.Tensor]:
        masked_ids, labels = span_mask_batch(batch["input_ids"], encoded.attention_mask, self.config, self.vocabulary)
        return {"mlm": masked_lm_loss(step.model.text_encoder, masked_ids, encoded.attention_mask, labels,
                                      encoded.image_tokens)}
