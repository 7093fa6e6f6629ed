"""Masked language modelling: ALBEF's token masking and its loss with momentum distillation.

``mask_tokens`` follows ALBEF's ``mask`` (reference/albef.md section 2): each token is chosen with
probability ``probability`` (Bernoulli), except PAD, CLS and any ``never_mask_ids`` (e.g. SEP when the
tokenizer keeps it, or PEVL position tokens). Of the chosen tokens, Bernoulli(0.8) become ``[MASK]``;
of the rest, Bernoulli(0.5) become a random id drawn uniformly over the whole vocabulary (special
tokens included, as ALBEF), about 10% in all; the remaining ~10% stay unchanged. ``labels`` hold the
original id at chosen positions and -100 elsewhere. The input is never modified in place.

``mlm_loss`` is ``(1 - alpha) * CE + alpha * distill``, both averaged over the chosen positions, with
``distill = -sum_v softmax(logits_m)_v * log_softmax(logits)_v`` over the VOCABULARY axis (ALBEF after
commit b726f8e; the earlier ``dim=1`` version summed over the sequence by mistake). A batch in which no
token was chosen (short captions, small batches) gives a zero loss that stays in the graph instead of
ALBEF's NaN, so one unlucky batch cannot poison the weights.

Use::

    masked_ids, labels = mask_tokens(input_ids, vocab_size=30522, mask_token_id=103, pad_token_id=0,
                                     cls_token_id=101, generator=generator)
    logits = text_encoder(masked_ids, image_embeds)                 # [B, T, V]
    with torch.no_grad():
        logits_m = momentum_text_encoder(masked_ids, image_embeds_m)
    loss = mlm_loss(logits, labels, logits_m, alpha)

``MLM`` is the objective (``objectives.mlm``): masking at ``probability``, the fusion layers reading the image
tokens, and the momentum text encoder's logits as soft targets when distillation is on.

Tests: ``.venv/bin/python -m pytest -q tests/pretrain/objectives/test_mlm.py``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pretrain.config import require
from pretrain.models.encoded import Encoded
from pretrain.objectives.base import BuildContext, Needs, Objective, StepContext

IGNORE_INDEX = -100


def _bernoulli(shape: torch.Size, probability: float, device, generator: torch.Generator | None) -> torch.Tensor:
    return torch.bernoulli(torch.full(shape, probability, device=device), generator=generator).bool()


def mask_tokens(
    input_ids: torch.Tensor,
    *,
    vocab_size: int,
    mask_token_id: int,
    pad_token_id: int,
    cls_token_id: int,
    probability: float = 0.15,
    generator: torch.Generator | None = None,
    never_mask_ids: Iterable[int] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(masked_ids, labels)`` for ``input_ids`` (long, any shape, usually [B, T]).

    ``generator`` (on ``input_ids``' device) makes the draw reproducible; the random draws happen in
    ALBEF's order: chosen, then [MASK], then random-vs-unchanged, then the random ids.
    """
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"mlm probability must lie in [0, 1], got {probability}")
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    device = input_ids.device
    # masked_fill / where rather than boolean-mask assignment, and no id list copied to the device: the
    # same values without a host sync.
    chosen = _bernoulli(input_ids.shape, probability, device, generator)
    for protected_id in (pad_token_id, cls_token_id, *never_mask_ids):
        chosen &= input_ids != protected_id
    labels = input_ids.masked_fill(~chosen, IGNORE_INDEX)

    to_mask_token = _bernoulli(input_ids.shape, 0.8, device, generator) & chosen
    masked_ids = input_ids.masked_fill(to_mask_token, mask_token_id)

    to_random = _bernoulli(input_ids.shape, 0.5, device, generator) & chosen & ~to_mask_token
    random_ids = torch.randint(vocab_size, input_ids.shape, device=device, dtype=input_ids.dtype, generator=generator)
    return torch.where(to_random, random_ids, masked_ids), labels


def mlm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    logits_m: torch.Tensor | None = None,
    alpha: float = 0.0,
) -> torch.Tensor:
    """ALBEF MLM loss. logits, logits_m: [B, T, V]; labels: [B, T] with -100 at positions not scored.

    With ``logits_m`` None (or ``alpha`` 0) this is ``F.cross_entropy(..., ignore_index=-100)``. The
    momentum logits are treated as fixed targets (no gradient). Computed in fp32 on the chosen positions
    only, which also keeps the [B, T, V] tensors out of fp32.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {list(logits.shape)} must be labels {list(labels.shape)} plus a vocabulary axis")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    # The step's one host sync: finding the M scored positions (their count sizes everything below). Loss
    # over all positions with ignore_index would avoid it but sums in another order, which changes ALBEF's
    # numbers in the last bits; one nonzero per step instead of a sync per gather.
    rows = (labels != IGNORE_INDEX).reshape(-1).nonzero().squeeze(1)
    if rows.numel() == 0:
        return logits.sum() * 0.0

    vocabulary = logits.shape[-1]
    scored_logits = logits.reshape(-1, vocabulary).index_select(0, rows).float()  # [M, V]
    log_probabilities = F.log_softmax(scored_logits, dim=-1)
    cross_entropy = F.nll_loss(log_probabilities, labels.reshape(-1).index_select(0, rows))
    if logits_m is None or alpha == 0.0:
        return cross_entropy
    if logits_m.shape != logits.shape:
        raise ValueError(f"logits_m {list(logits_m.shape)} must match logits {list(logits.shape)}")
    soft_targets = F.softmax(logits_m.detach().reshape(-1, vocabulary).index_select(0, rows).float(), dim=-1)
    distill = -(log_probabilities * soft_targets).sum(dim=-1).mean()
    return (1.0 - alpha) * cross_entropy + alpha * distill


@dataclass(frozen=True)
class MLMConfig:
    """``objectives.mlm`` options."""

    probability: float = 0.15                     # share of text tokens chosen for prediction

    def __post_init__(self):
        require(0.0 <= self.probability <= 1.0, "probability", f"must lie in [0, 1], got {self.probability}")


class MLM(Objective):
    """Masked language modelling through every text layer, the fusion layers reading the image; term ``mlm``.

    With momentum distillation (``distillation.alpha`` > 0) the momentum text encoder, reading the momentum
    image tokens, gives the soft targets, as ALBEF.
    """

    Config = MLMConfig
    terms = ("mlm",)

    def __init__(self, config: MLMConfig, build: BuildContext):
        super().__init__(config, build)
        tokenizer = build.tokenizer
        self.special = {"vocab_size": tokenizer.vocab_size, "mask_token_id": tokenizer.mask_token_id,
                        "pad_token_id": tokenizer.pad_token_id, "cls_token_id": tokenizer.cls_token_id}
        self.distill = build.distillation_alpha > 0

    def needs(self) -> Needs:
        return Needs(momentum=("visual_encoder", "text_encoder")) if self.distill else Needs()

    def forward(self, encoded: Encoded, encoded_m: Encoded | None, batch: dict,
                step: StepContext) -> dict[str, torch.Tensor]:
        masked_ids, labels = mask_tokens(batch["input_ids"], probability=self.config.probability, **self.special)
        text_encoder = step.model.text_encoder
        logits = text_encoder.mlm_logits(text_encoder(masked_ids, encoded.attention_mask, encoded.image_tokens))
        logits_m = None
        if step.alpha > 0 and self.distill:
            with torch.no_grad(), step.autocast(encoded_m.image_tokens):
                text_encoder_m = step.momentum.text_encoder
                logits_m = text_encoder_m.mlm_logits(text_encoder_m(masked_ids, encoded.attention_mask,
                                                                    encoded_m.image_tokens))
        return {"mlm": mlm_loss(logits.float(), labels, logits_m.float() if logits_m is not None else None,
                                step.alpha)}
