"""An image-text scorer from any checkpoint this project loads: its ITC towers and projections, frozen, in eval mode.

ViCHA scores words and images with CLIP to choose each image's visual concepts and to filter noisy pairs;
here the scorer is a model this project trained or imported, so nothing is downloaded:

    scorer = load_scorer("runs/albef/checkpoints")          # a pretraining run (any ZeRO stage)
    scorer = load_scorer("albef.safetensors")                # pretrain.export output (config inside)
    scorer = load_scorer("ALBEF.pth", config="pretrain/configs/albef.yaml")   # a released file: give its model
    images = scorer.image_features(pixels)                   # [B, E], L2-normalised ITC features
    texts = scorer.text_features(["circle", "a red circle"])  # [T, E]
    similarity = images @ texts.T

A backbone that reads visual concepts (ViCHA) scores images with an empty concept list ([CLS] alone),
since the concepts are what is being chosen. ``data_shards concepts`` and ``data_shards filter`` use it.
"""

from __future__ import annotations

import os

import torch
import yaml

from pretrain.build import build_backbone
from pretrain.checkpoint import read_latest
from pretrain.config import ConfigError, from_mapping, load_config
from pretrain.export import albef_state_dict
from pretrain.models import read_state_dict
from pretrain.models.albef import from_albef_state_dict
from pretrain.schema import ModelConfig, PretrainConfig
from pretrain.text import pre_caption


class ScorerError(ValueError):
    """A checkpoint or config the scorer cannot use; the message says what to give instead."""


class ImageTextScorer:
    """ITC features of images and texts from a backbone (``ALBEFModel``) and its tokenizer."""

    def __init__(self, model, tokenizer, image_size: int, device: str | torch.device = "cpu"):
        self.model = model.eval().to(device)
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.device = torch.device(device)

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` normalised pixels at ``image_size`` -> ``[B, E]`` unit ITC features (fp32)."""
        images = images.to(self.device)
        concepts = None
        if getattr(self.model, "concept_encoder", None) is not None:
            empty = self.tokenizer([""] * images.shape[0])
            concepts = (empty["input_ids"].to(self.device), empty["attention_mask"].to(self.device))
        return self.model.image_embeddings(images, concepts)[1].float()

    @torch.no_grad()
    def text_features(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """Texts, cleaned as captions -> ``[T, E]`` unit ITC features (fp32)."""
        features = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer([pre_caption(text) for text in texts[start:start + batch_size]])
            features.append(self.model.text_embeddings(tokens["input_ids"].to(self.device),
                                                       tokens["attention_mask"].to(self.device))[1].float())
        return torch.cat(features) if features else torch.zeros(0, self.model.text_proj.out_features)


def _model_config_from(text: str, where: str) -> ModelConfig:
    tree = yaml.safe_load(text) or {}
    if not isinstance(tree, dict) or "model" not in tree:
        raise ScorerError(f"{where} holds no model section; pass --config with the experiment YAML")
    return from_mapping(ModelConfig, tree["model"], "model")


def _weights_and_config(checkpoint: str, config: str | None, trusted: bool) -> tuple[dict, ModelConfig]:
    if config is not None:
        model_config = load_config(PretrainConfig, config).model
    if os.path.isdir(checkpoint):
        directory, tag = os.path.normpath(checkpoint), None
        if os.path.basename(directory).startswith("global_step"):
            directory, tag = os.path.dirname(directory), os.path.basename(directory)
        elif read_latest(directory) is None and read_latest(os.path.join(directory, "checkpoints")):
            directory = os.path.join(directory, "checkpoints")
        tag = tag or read_latest(directory)
        if tag is None:
            raise ScorerError(f"checkpoint {checkpoint!r}: no 'latest' file in it or in its checkpoints/ folder; "
                              "give a pretraining run's checkpoints directory, a global_stepN directory or a file")
        if config is None:
            saved = os.path.join(directory, tag, "config.yaml")
            if not os.path.exists(saved):
                raise ScorerError(f"{saved} does not exist; pass --config with the run's experiment YAML")
            with open(saved) as handle:
                model_config = _model_config_from(handle.read(), saved)
        return albef_state_dict(directory, tag, trusted), model_config
    if not os.path.isfile(checkpoint):
        raise ScorerError(f"checkpoint {checkpoint!r} does not exist")
    state = read_state_dict(checkpoint, trusted)
    if config is None:
        beside = os.path.splitext(checkpoint)[0] + ".yaml"
        if not os.path.exists(beside):
            raise ScorerError(f"{checkpoint} comes without its experiment YAML ({beside}); pass --config with a "
                              "YAML whose model section describes the checkpoint's model")
        with open(beside) as handle:
            model_config = _model_config_from(handle.read(), beside)
    return state, model_config


def load_scorer(checkpoint: str, config: str | None = None, *, device: str = "cpu",
                trusted: bool = False) -> ImageTextScorer:
    """The scorer of a checkpoint (see the module docstring); ``config`` overrides the model it describes."""
    try:
        state, model_config = _weights_and_config(checkpoint, config, trusted)
    except ConfigError as error:
        raise ScorerError(f"config for {checkpoint}: {error}") from None
    model, tokenizer = build_backbone(model_config)
    model_state, _momentum, _queues = from_albef_state_dict(state, num_patches=model.visual_encoder.num_patches)
    own = model.state_dict()
    # Heads of pretraining objectives and the MLM head are not needed to score; the towers must all be there.
    wanted = {name: value for name, value in model_state.items() if name in own}
    missing = sorted(name for name in own if name not in wanted and not name.startswith("text_encoder.cls."))
    mis_shaped = sorted(name for name, value in wanted.items() if value.shape != own[name].shape)
    if missing or mis_shaped:
        raise ScorerError(f"{checkpoint} does not fit the model its config describes: missing {missing[:8]}, "
                          f"mis-shaped {mis_shaped[:8]}; pass --config with the model it was trained with")
    model.load_state_dict(wanted, strict=False)
    return ImageTextScorer(model, tokenizer, model_config.image_size, device)
