"""Image-text matching: hard-negative sampling, labels and loss (reference/albef.md sections 2 and 5).

ALBEF builds an ITM batch of B positives ``(text_b, image_b)`` followed by B pairs ``(text_b, image_neg[b])``
and B pairs ``(text_neg[b], image_b)``; labels ``[1]*B + [0]*2B``; plain cross-entropy on the fused CLS.
Negatives are drawn from the local batch in proportion to ``softmax`` of the in-batch ITC similarities
(``ITCOutput.in_batch_sim_i2t`` / ``in_batch_sim_t2i``).

``sample_hard_negatives`` is robust where ALBEF raises "invalid multinomial distribution" (batch of 1,
every pair the same image, NaN similarities under AMP): excluded pairs get -inf BEFORE the softmax, so
they can never be drawn, and rows without a usable distribution fall back as follows:

- some candidates allowed but a similarity among them is NaN or infinite: uniform over the allowed ones;
- no candidate allowed (B == 1, or all B pairs show the same image): a uniform random OTHER index when
  B > 1, else the row's own index. Such a "negative" may in fact match; ``has_allowed_negative`` tells
  which rows are affected and ``itm_loss(..., valid=itm_valid_mask(...))`` drops them from the loss.

``exclude[i, t]`` is True when image i and text t must not form a negative pair: the diagonal
(``diagonal_exclusion``) in pretraining, every same-image pair (``same_image_exclusion``) in retrieval.

Use::

    exclude = same_image_exclusion(image_ids)                       # or diagonal_exclusion(B, device)
    negative_image_index, negative_text_index = sample_hard_negatives(sim_i2t, sim_t2i, exclude)
    texts = torch.cat([text, text, text[negative_text_index]])
    images = torch.cat([image, image[negative_image_index], image])
    logits = itm_head(fused_cls(texts, images))                      # [3B, 2]
    loss = itm_loss(logits, itm_labels(B, logits.device), valid=itm_valid_mask(exclude))

``ITM`` is the objective (``objectives.itm``): it draws from ITC's in-batch similarities of the same step
when ITC ran first, as ALBEF does.

Tests: ``.venv/bin/python -m pytest -q tests/pretrain/objectives/test_itm.py``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from pretrain.models.encoded import Encoded
from pretrain.objectives.base import Objective, StepContext


class HardNegatives(NamedTuple):
    """Unpacks as ``(negative_image_index, negative_text_index)``."""

    negative_image_index: torch.Tensor  # [B] long: the image paired with text b as a negative
    negative_text_index: torch.Tensor  # [B] long: the text paired with image b as a negative


def diagonal_exclusion(batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """bool [B, B] with only the diagonal True: pretraining, where each image appears once per batch."""
    return torch.eye(batch_size, dtype=torch.bool, device=device)


def same_image_exclusion(image_ids: torch.Tensor) -> torch.Tensor:
    """bool [B, B], True where image i and text t come from the same image id (retrieval)."""
    image_ids = image_ids.reshape(-1)
    return image_ids[:, None] == image_ids[None, :]


def _sampling_weights(similarity: torch.Tensor, exclude: torch.Tensor) -> torch.Tensor:
    """Row-wise weights over candidates; rows always have a positive sum (see the module docstring)."""
    batch_size = similarity.shape[0]
    allowed = ~exclude
    has_allowed = allowed.any(dim=1, keepdim=True)
    finite_where_allowed = (torch.isfinite(similarity) | exclude).all(dim=1, keepdim=True)

    masked = similarity.float().masked_fill(exclude, float("-inf"))
    # Rows that will not use the softmax get zeros first, so that softmax of an all -inf row (NaN) never
    # reaches the final weights through torch.where's untaken branch.
    usable = has_allowed & finite_where_allowed
    softmax_weights = F.softmax(torch.where(usable, masked, torch.zeros_like(masked)), dim=1)
    softmax_weights = softmax_weights.masked_fill(exclude, 0.0)

    uniform_allowed = allowed.float()
    other = ~torch.eye(batch_size, dtype=torch.bool, device=similarity.device)
    if batch_size == 1:
        other = torch.ones_like(other)
    fallback_without_allowed = other.float()

    weights = torch.where(usable, softmax_weights, uniform_allowed)
    return torch.where(has_allowed, weights, fallback_without_allowed)


@torch.no_grad()
def sample_hard_negatives(
    sim_i2t: torch.Tensor,
    sim_t2i: torch.Tensor,
    exclude: torch.Tensor,
    generator: torch.Generator | None = None,
) -> HardNegatives:
    """One negative image per text and one negative text per image, drawn from the local batch.

    sim_i2t: [B, B] image rows vs text columns. sim_t2i: [B, B] text rows vs image columns.
    exclude: bool [B, B], ``exclude[i, t]`` True = image i with text t must not be a negative pair.
    generator: optional ``torch.Generator`` on the similarities' device, for reproducible draws.
    Never raises on degenerate rows; see the module docstring for the fallbacks.
    """
    batch_size = sim_i2t.shape[0]
    for name, tensor in (("sim_i2t", sim_i2t), ("sim_t2i", sim_t2i), ("exclude", exclude)):
        if tuple(tensor.shape) != (batch_size, batch_size):
            raise ValueError(f"{name} must be [{batch_size}, {batch_size}], got {list(tensor.shape)}")
    exclude = exclude.to(device=sim_i2t.device, dtype=torch.bool)
    # Text t chooses among images i with exclude[i, t] False: the transposed mask, row per text.
    weights_t2i = _sampling_weights(sim_t2i, exclude.T)
    weights_i2t = _sampling_weights(sim_i2t, exclude)
    negative_image_index = torch.multinomial(weights_t2i, 1, generator=generator).squeeze(1)
    negative_text_index = torch.multinomial(weights_i2t, 1, generator=generator).squeeze(1)
    return HardNegatives(negative_image_index, negative_text_index)


def has_allowed_negative(exclude: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(text_has_negative_image [B], image_has_negative_text [B])``: False where the sampler had to fall
    back to a possibly matching pair (see the module docstring)."""
    allowed = ~exclude.to(torch.bool)
    return allowed.any(dim=0), allowed.any(dim=1)


def itm_labels(batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """long [3B]: ``[1]*B`` positives, then ``[0]*2B`` for (text, negative image) and (negative text, image)."""
    labels = torch.zeros(3 * batch_size, dtype=torch.long, device=device)
    labels[:batch_size] = 1
    return labels


def itm_valid_mask(exclude: torch.Tensor) -> torch.Tensor:
    """bool [3B] in ``itm_labels`` order: positives always valid, negatives valid where a real one existed."""
    text_has_negative_image, image_has_negative_text = has_allowed_negative(exclude)
    positives = torch.ones_like(text_has_negative_image)
    return torch.cat([positives, text_has_negative_image, image_has_negative_text])


def itm_loss(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of ``logits`` [N, 2] against ``labels`` [N], averaged over rows (or over ``valid`` rows)."""
    if logits.dim() != 2 or logits.shape[0] != labels.shape[0]:
        raise ValueError(
            f"logits must be [N, classes] with N = len(labels), got {list(logits.shape)} and {list(labels.shape)}"
        )
    losses = F.cross_entropy(logits.float(), labels, reduction="none")
    if valid is None:
        return losses.mean()
    valid = valid.to(device=losses.device, dtype=losses.dtype)
    # Positives are always valid, so the count is at least B >= 1.
    return (losses * valid).sum() / valid.sum().clamp_min(1.0)


class ITM(Objective):
    """Image-text matching on the fused [CLS] with hard negatives from the local batch; term ``itm``.

    Negatives are drawn from ITC's in-batch similarities of the same step when ITC ran before it (ALBEF);
    otherwise from the online features' similarities.
    """

    terms = ("itm",)

    def forward(self, encoded: Encoded, encoded_m: Encoded | None, batch: dict,
                step: StepContext) -> dict[str, torch.Tensor]:
        model = step.model
        image_tokens, text_hidden, attention_mask = encoded.image_tokens, encoded.text_hidden, encoded.attention_mask
        batch_size = image_tokens.shape[0]
        if "itc_similarity" in step.shared:
            sim_i2t, sim_t2i = step.shared["itc_similarity"]
        else:
            with torch.no_grad():
                sim_i2t = encoded.image_feat.float() @ encoded.text_feat.float().T / model.temp.float()
                sim_t2i = sim_i2t.T
        with torch.no_grad():
            negative_image, negative_text = sample_hard_negatives(
                sim_i2t.float(), sim_t2i.float(), diagonal_exclusion(batch_size, image_tokens.device))
        texts = torch.cat([text_hidden, text_hidden, text_hidden[negative_text]])
        masks = torch.cat([attention_mask, attention_mask, attention_mask[negative_text]])
        images = torch.cat([image_tokens, image_tokens[negative_image], image_tokens])
        logits = model.itm_head(model.fused_cls(texts, masks, images))
        return {"itm": itm_loss(logits.float(), itm_labels(batch_size).to(logits.device))}
