"""What one pass of both towers gives the objectives: the ``Encoded`` record, and ``encode`` that makes it.

Every objective reads the same record instead of tuples: ``encoded.image_tokens`` (all ViT tokens after the
final norm, the keys of the fusion layers' cross-attention), ``encoded.image_feat`` / ``encoded.text_feat``
(L2-normalised projected [CLS], what contrastive terms compare), ``encoded.text_hidden`` (the text-only
layers' output, what the fusion layers read), and, when an objective asks for them through ``Wants``, the
states of chosen ViT blocks and text layers (``encoded.image_layers[k]``, ``encoded.text_layers[k]``).

``encode`` runs on anything that holds the four towers as attributes, so the momentum side makes the same
record from its EMA copies in the same place::

    encoded = encode(model, images, input_ids, attention_mask, wants)            # online, with gradients
    encoded_m = encode(momentum.towers(), images, input_ids, attention_mask, wants)  # EMA copies, no_grad

A tower the holder lacks (a momentum side that copies only some modules) leaves its fields None.

A backbone with a concept encoder (ViCHA's visual concepts, ``pretrain.models.concepts``) needs each image's
concept tokens: ``encode(..., concepts=concept_inputs(batch))`` appends them to the ViT sequence, so
``image_tokens`` holds ``[CLS, patches, concept tokens]`` and ``concept_tokens`` the projected concepts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# The towers the record is made from, in the order ALBEF runs them; also the modules ALBEF keeps momentum
# (EMA) copies of, saved as ``<name>_m.*``. ``concept_encoder`` exists only in backbones that read visual
# concepts (ViCHA); its tokens are part of the image tower's input.
TOWERS = ("visual_encoder", "vision_proj", "text_encoder", "text_proj", "concept_encoder")


@dataclass(frozen=True)
class Wants:
    """Intermediate states some objective needs on top of the final ones (indices as ``hidden_states``)."""

    image_layers: frozenset[int] = frozenset()
    text_layers: frozenset[int] = frozenset()

    def __or__(self, other: Wants) -> Wants:
        return Wants(self.image_layers | other.image_layers, self.text_layers | other.text_layers)


FINAL_ONLY = Wants()  # no intermediate states: the plain forward of both towers


@dataclass
class Encoded:
    """Both towers' outputs for one batch; None where the holder had no such tower."""

    attention_mask: torch.Tensor                     # [B, T] of the text
    image_tokens: torch.Tensor | None = None         # [B, 1+N, D] after the ViT's final norm, CLS first
    image_feat: torch.Tensor | None = None           # [B, E] normalised projection of the image CLS
    text_hidden: torch.Tensor | None = None          # [B, T, H] output of the text-only layers
    text_feat: torch.Tensor | None = None            # [B, E] normalised projection of the text CLS
    image_layers: dict[int, torch.Tensor] = field(default_factory=dict)  # block index -> [B, S, D]
    text_layers: dict[int, torch.Tensor] = field(default_factory=dict)   # layer index -> [B, T, H]
    concept_tokens: torch.Tensor | None = None       # [B, E, D] concept tokens appended to the ViT sequence


def concept_inputs(batch: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(concept_ids, concept_mask)`` of a batch whose adapter added concepts, else None."""
    if "concept_ids" not in batch:
        return None
    return batch["concept_ids"], batch["concept_mask"]


def momentum_towers(asked, holder) -> tuple[str, ...]:
    """The towers of ``holder`` to keep momentum copies of, in ``TOWERS`` order: those asked for that it has,
    and its concept encoder whenever the image tower is copied (the momentum image tokens read its concepts)."""
    wanted = set(asked) | ({"concept_encoder"} if "visual_encoder" in asked else set())
    return tuple(name for name in TOWERS if name in wanted and getattr(holder, name, None) is not None)


def encode(towers, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
           wants: Wants = FINAL_ONLY, concepts: tuple[torch.Tensor, torch.Tensor] | None = None) -> Encoded:
    """Run the towers ``towers`` holds (``visual_encoder``, ``vision_proj``, ``text_encoder``, ``text_proj``,
    ``concept_encoder``); ``concepts`` are ``(concept_ids, concept_mask)`` when it has a concept encoder.

    Images are cast to the image tower's parameter dtype (bf16/fp16 under such engines).
    """
    encoded = Encoded(attention_mask=attention_mask)
    visual_encoder = getattr(towers, "visual_encoder", None)
    if visual_encoder is not None:
        images = images.to(next(visual_encoder.parameters()).dtype)
        extra = encoded.concept_tokens = concept_tokens(towers, concepts)
        if wants.image_layers or extra is not None:
            output = visual_encoder.encode(images, layers=tuple(sorted(wants.image_layers)), extra_tokens=extra)
            encoded.image_tokens, encoded.image_layers = output.tokens, output.layers
        else:
            encoded.image_tokens = visual_encoder(images)
        vision_proj = getattr(towers, "vision_proj", None)
        if vision_proj is not None:
            encoded.image_feat = F.normalize(vision_proj(encoded.image_tokens[:, 0]), dim=-1)
    text_encoder = getattr(towers, "text_encoder", None)
    if text_encoder is not None:
        if wants.text_layers:
            encoded.text_hidden, encoded.text_layers = text_encoder.encode_text_layers(
                input_ids, attention_mask, tuple(sorted(wants.text_layers)))
        else:
            encoded.text_hidden = text_encoder.encode_text(input_ids, attention_mask)
        text_proj = getattr(towers, "text_proj", None)
        if text_proj is not None:
            encoded.text_feat = F.normalize(text_proj(encoded.text_hidden[:, 0]), dim=-1)
    return encoded


def concept_tokens(towers, concepts: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor | None:
    """The ViT extra tokens of ``towers``' concept encoder (None when it has none); an error when it has one
    and no concepts came with the batch."""
    concept_encoder = getattr(towers, "concept_encoder", None)
    if concept_encoder is None:
        return None
    if concepts is None:
        raise ValueError("this model reads visual concepts (it has a concept encoder), but the batch carries "
                         "none: give every sample json.concepts (python -m data_shards concepts) and a batch "
                         "adapter that tokenises them (pretrain.models.concepts.ConceptBatch)")
    return concept_encoder(*concepts)
