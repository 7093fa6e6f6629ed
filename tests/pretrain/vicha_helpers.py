"""Tiny backbones and batches that the ViCHA tests share (concept encoder, hierarchical ITC, MAE, the importer)."""

from __future__ import annotations

import torch

from pretrain.build import build_backbone
from pretrain.config import from_mapping
from pretrain.schema import ModelConfig
from tests.pretrain.conftest import TINY_MODEL

CAPTIONS = ["a red circle", "two blue squares", "a green triangle", "one small yellow circle"]
CONCEPTS = [["circle", "red"], ["square", "blue", "squares"], ["triangle", "green"], ["circle", "yellow", "small"]]


def tiny_model_config(depth: int = 2, text_layers: int = 3, concept_layers: int = 0, **changes) -> ModelConfig:
    """The tests' tiny model (32 px, 64 wide), with ``depth`` ViT blocks, ``text_layers`` text-only layers and one
    fusion layer, and a concept encoder of ``concept_layers`` layers when that is not 0."""
    values = dict(TINY_MODEL, vision_overrides=dict(TINY_MODEL["vision_overrides"], depth=depth),
                  text_overrides=dict(TINY_MODEL["text_overrides"], num_hidden_layers=text_layers + 1),
                  fusion_layer=text_layers, concepts={"layers": concept_layers})
    values.update(changes)
    return from_mapping(ModelConfig, values, "model")


def tiny_backbone(depth: int = 2, text_layers: int = 3, concept_layers: int = 0, seed: int = 0):
    """``(ALBEFModel, tokenizer)`` of ``tiny_model_config``, random weights under ``seed``, in eval mode."""
    torch.manual_seed(seed)
    model, tokenizer = build_backbone(tiny_model_config(depth, text_layers, concept_layers))
    return model.eval(), tokenizer


def tiny_images(batch: int = 4, seed: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
