"""Hierarchical image-text contrast (ViCHA's H-ITC): in-batch InfoNCE between intermediate layers of both towers.

ViCHA (reference/methods.md section 2) adds, to ALBEF's ITC on the final [CLS] states, one contrastive term
per pair of (ViT block, text layer), paired in order: ViT blocks 7, 8, 9, 10, 11 with BERT text layers
1, 2, 3, 4, 5 for ViT-B and BERT-base (``image_hidden_states[-6:-1]`` and ``hidden_states[-6:-1]`` in its
code). Each pair has its own projections (``vision_proj_hidden[i]``, ``text_proj_hidden[i]``: Linear to
``embed_dim``); the ViT [CLS] state of each block goes through the ViT's final LayerNorm first (ViCHA keeps
``norm(x)`` after every block); features are L2-normalised; the temperature is ALBEF's, shared; negatives
are the whole global batch, with no queue and no momentum targets. The term is the weighted sum over
pairs, ``sum_i pair_weights[i] * ITC_i``; the objective's ``weight`` is ViCHA's ``ita_hidden_weight``
(0.1), so the total adds ``0.1 * sum_i ITC_i`` as ViCHA's ``loss_ita`` does::

    objectives: {hitc: {weight: 0.1, image_layers: [7, 8, 9, 10, 11], text_layers: [1, 2, 3, 4, 5]}}

Layer indices count as Hugging Face ``hidden_states``: image state ``i`` is the output of ViT block ``i``
(1-based), text state ``i`` the output of text layer ``i``, 0 the embeddings; they are checked against the
encoders' depths when the objective is built.

One process computes exactly ViCHA's numbers. Across ranks ViCHA gathers features without gradient and
puts the target on the LOCAL diagonal of the gathered columns (right on rank 0 only); here the matching
column of every rank is the target and gradients flow through the gathered features
(``contrastive_loss_in_batch``), so the update equals that of one process holding the global batch.

Tests: ``.venv/bin/python -m pytest -q tests/pretrain/objectives/test_hitc.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.config import ConfigError, require
from pretrain.models.encoded import Encoded, Wants
from pretrain.objectives.base import BuildContext, Needs, Objective, StepContext
from pretrain.objectives.itc import contrastive_loss_in_batch


def hierarchical_itc_loss(image_cls: list[torch.Tensor], text_cls: list[torch.Tensor],
                          vision_projections: nn.ModuleList, text_projections: nn.ModuleList,
                          temp: torch.Tensor | float, weights: list[float]) -> torch.Tensor:
    """``sum_i weights[i] * ITC(normalise(vision_projections[i](image_cls[i])), normalise(text_projections[i](
    text_cls[i])))`` with in-batch negatives gathered over ranks. ``image_cls[i]`` [B, D] are already layer-normed."""
    if not len(image_cls) == len(text_cls) == len(vision_projections) == len(text_projections) == len(weights):
        raise ValueError("hierarchical ITC needs one image state, text state, projection pair and weight per pair")
    total = 0.0
    for image, text, vision_projection, text_projection, weight in zip(
            image_cls, text_cls, vision_projections, text_projections, weights, strict=True):
        image_feat = F.normalize(vision_projection(image), dim=-1)
        text_feat = F.normalize(text_projection(text), dim=-1)
        total = total + weight * contrastive_loss_in_batch(image_feat, text_feat, temp)
    return total


@dataclass(frozen=True)
class HierarchicalITCConfig:
    """``objectives.hitc`` options (ViCHA ``num_hidden_align`` 5, ``ita_hidden_weights`` all 1)."""

    image_layers: tuple[int, ...] = (7, 8, 9, 10, 11)    # ViT block outputs (1-based), paired in order with...
    text_layers: tuple[int, ...] = (1, 2, 3, 4, 5)       # ...text layer outputs (1-based)
    pair_weights: tuple[float, ...] | None = None        # one per pair; None = all 1

    def __post_init__(self):
        require(len(self.image_layers) > 0, "image_layers", "lists no layer; give at least one pair")
        require(len(self.image_layers) == len(self.text_layers), "text_layers",
                f"pairs with image_layers in order: {len(self.image_layers)} image layers "
                f"{list(self.image_layers)}, {len(self.text_layers)} text layers {list(self.text_layers)}")
        if self.pair_weights is not None:
            require(len(self.pair_weights) == len(self.image_layers), "pair_weights",
                    f"needs one weight per pair ({len(self.image_layers)}), got {list(self.pair_weights)}")
            require(all(weight >= 0 for weight in self.pair_weights), "pair_weights",
                    f"must be >= 0, got {list(self.pair_weights)}")


class HierarchicalITC(Objective):
    """ViCHA's H-ITC over chosen (ViT block, text layer) pairs; term ``hitc`` (see the module docstring)."""

    Config = HierarchicalITCConfig
    terms = ("hitc",)

    def __init__(self, config: HierarchicalITCConfig, build: BuildContext):
        super().__init__(config, build)
        model = build.model
        depth, text_depth = len(model.visual_encoder.blocks), model.text_encoder.fusion_layer
        for key, layers, top, what in (("image_layers", config.image_layers, depth, f"the ViT's {depth} blocks"),
                                       ("text_layers", config.text_layers, text_depth,
                                        f"the text encoder's {text_depth} text-only layers (below fusion_layer)")):
            outside = [layer for layer in layers if not 0 <= layer <= top]
            if outside:
                raise ConfigError(f"objectives.hitc.{key}: {outside} outside 0..{top}; states are 0 (embeddings) "
                                  f"and 1..{top}, the outputs of {what}")
        embed_dim = model.vision_proj.out_features
        pairs = len(config.image_layers)
        self.vision_proj_hidden = nn.ModuleList(nn.Linear(model.visual_encoder.width, embed_dim)
                                                for _ in range(pairs))
        self.text_proj_hidden = nn.ModuleList(nn.Linear(model.text_encoder.hidden_size, embed_dim)
                                              for _ in range(pairs))
        self.weights = list(config.pair_weights) if config.pair_weights is not None else [1.0] * pairs

    def needs(self) -> Needs:
        return Needs(wants=Wants(image_layers=frozenset(self.config.image_layers),
                                 text_layers=frozenset(self.config.text_layers)))

    def forward(self, encoded: Encoded, encoded_m: Encoded | None, batch: dict,
                step: StepContext) -> dict[str, torch.Tensor]:
        model = step.model
        # LayerNorm acts per token, so norming the [CLS] alone equals ViCHA's norm over every token, then [CLS].
        image_cls = [model.visual_encoder.norm(encoded.image_layers[layer][:, 0]) for layer in self.config.image_layers]
        text_cls = [encoded.text_layers[layer][:, 0] for layer in self.config.text_layers]
        loss = hierarchical_itc_loss(image_cls, text_cls, self.vision_proj_hidden, self.text_proj_hidden,
                                     model.temp.float(), self.weights)
        return {"hitc": loss}
