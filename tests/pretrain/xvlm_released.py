"""State dicts in the layout of released X-VLM checkpoints, written from X-VLM's model definitions (its
``models/swin_transformer.py``, ``clip_vit.py``, ``vit.py``, ``xbert.py`` and ``xvlm.py``): every key its modules
register, parameters and persistent buffers, with their shapes, random values for parameters and the buffers as its
code computes them. No released file can be downloaded here, so the importer is tested on these.

    state = released_state(TextShape(...), SwinShape(...), heads=("itm", "bbox"))   # a pretraining file's "model"
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pretrain.importers.xvlm import swin_relative_position_index, swin_shift_mask


@dataclass(frozen=True)
class TextShape:
    hidden: int = 64
    layers: int = 3
    fusion_layer: int = 2
    intermediate: int = 128
    vocab: int = 30522
    positions: int = 512


@dataclass(frozen=True)
class SwinShape:
    image: int = 64
    embed: int = 16
    depths: tuple[int, ...] = (2, 2)
    heads: tuple[int, ...] = (1, 2)
    window: int = 4

    @property
    def width(self) -> int:
        return self.embed * 2 ** (len(self.depths) - 1)


@dataclass(frozen=True)
class ViTShape:
    image: int = 32
    patch: int = 8
    width: int = 64
    depth: int = 2
    clip: bool = False                             # CLIPVisionTransformer's names, else X-VLM's DeiT ViT


class Filler:
    """Random parameters, reproducible."""

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator) * 0.05


def _linear(out: dict, name: str, fill: Filler, rows: int, columns: int, bias: bool = True) -> None:
    out[f"{name}.weight"] = fill(rows, columns)
    if bias:
        out[f"{name}.bias"] = fill(rows)


def _norm(out: dict, name: str, fill: Filler, width: int) -> None:
    out[f"{name}.weight"] = 1 + fill(width)
    out[f"{name}.bias"] = fill(width)


def swin_state(shape: SwinShape, fill: Filler) -> dict:
    """``vision_encoder.*`` of X-VLM's SwinTransformer (patch 4, ape off, patch norm on)."""
    out: dict = {}
    _linear(out, "patch_embed.proj", fill, shape.embed, 3 * 16)
    out["patch_embed.proj.weight"] = out["patch_embed.proj.weight"].reshape(shape.embed, 3, 4, 4)
    _norm(out, "patch_embed.norm", fill, shape.embed)
    resolution = shape.image // 4
    for stage, (depth, heads) in enumerate(zip(shape.depths, shape.heads, strict=True)):
        dim = shape.embed * 2 ** stage
        window = min(shape.window, resolution)
        for block in range(depth):
            shift = 0 if (block % 2 == 0 or resolution <= shape.window) else window // 2
            prefix = f"layers.{stage}.blocks.{block}."
            _norm(out, prefix + "norm1", fill, dim)
            out[prefix + "attn.relative_position_bias_table"] = fill((2 * window - 1) ** 2, heads)
            out[prefix + "attn.relative_position_index"] = swin_relative_position_index(window)
            _linear(out, prefix + "attn.qkv", fill, 3 * dim, dim)
            _linear(out, prefix + "attn.proj", fill, dim, dim)
            _norm(out, prefix + "norm2", fill, dim)
            _linear(out, prefix + "mlp.fc1", fill, 4 * dim, dim)
            _linear(out, prefix + "mlp.fc2", fill, dim, 4 * dim)
            if shift:
                out[prefix + "attn_mask"] = swin_shift_mask(resolution, window, shift)
        if stage < len(shape.depths) - 1:
            _norm(out, f"layers.{stage}.downsample.norm", fill, 4 * dim)
            out[f"layers.{stage}.downsample.reduction.weight"] = fill(2 * dim, 4 * dim)
            resolution //= 2
    _norm(out, "norm", fill, shape.width)
    return {f"vision_encoder.{name}": value for name, value in out.items()}


def vit_state(shape: ViTShape, fill: Filler) -> dict:
    """``vision_encoder.*`` of X-VLM's CLIPVisionTransformer or DeiT VisionTransformer."""
    out: dict = {}
    width, tokens = shape.width, (shape.image // shape.patch) ** 2 + 1
    if shape.clip:
        out["patch_embed.weight"] = fill(width, 3, shape.patch, shape.patch)
        out["class_embedding"] = fill(width)
        out["pos_embed.weight"] = fill(tokens, width)
        out["position_ids"] = torch.arange(tokens).expand((1, -1))
        _norm(out, "pre_layrnorm", fill, width)
        for layer in range(shape.depth):
            prefix = f"encoder.layers.{layer}."
            for part in ("k", "v", "q", "out"):
                _linear(out, prefix + f"self_attn.{part}_proj", fill, width, width)
            _norm(out, prefix + "layer_norm1", fill, width)
            _linear(out, prefix + "mlp.fc1", fill, 4 * width, width)
            _linear(out, prefix + "mlp.fc2", fill, width, 4 * width)
            _norm(out, prefix + "layer_norm2", fill, width)
        _norm(out, "post_layernorm", fill, width)
    else:
        out["cls_token"] = fill(1, 1, width)
        out["pos_embed"] = fill(1, tokens, width)
        out["patch_embed.proj.weight"] = fill(width, 3, shape.patch, shape.patch)
        out["patch_embed.proj.bias"] = fill(width)
        for layer in range(shape.depth):
            prefix = f"blocks.{layer}."
            _norm(out, prefix + "norm1", fill, width)
            _linear(out, prefix + "attn.qkv", fill, 3 * width, width)
            _linear(out, prefix + "attn.proj", fill, width, width)
            _norm(out, prefix + "norm2", fill, width)
            _linear(out, prefix + "mlp.fc1", fill, 4 * width, width)
            _linear(out, prefix + "mlp.fc2", fill, width, 4 * width)
        _norm(out, "norm", fill, width)
    return {f"vision_encoder.{name}": value for name, value in out.items()}


def bert_state(shape: TextShape, vision_width: int, fill: Filler, prefix: str, mlm_head: bool,
               layers: int | None = None, cross_from: int | None = None, cross_width: int | None = None) -> dict:
    """X-VLM's xbert ``BertForMaskedLM`` (``prefix`` + ``bert.*``, ``cls.*``) or ``BertModel`` (``prefix`` + ``*``)."""
    hidden = shape.hidden
    body = f"{prefix}bert." if mlm_head else prefix
    out: dict = {body + "embeddings.position_ids": torch.arange(shape.positions).expand((1, -1))}
    words = fill(shape.vocab, hidden)
    out[body + "embeddings.word_embeddings.weight"] = words
    out[body + "embeddings.position_embeddings.weight"] = fill(shape.positions, hidden)
    out[body + "embeddings.token_type_embeddings.weight"] = fill(2, hidden)
    _norm(out, body + "embeddings.LayerNorm", fill, hidden)
    for layer in range(shape.layers if layers is None else layers):
        name = f"{body}encoder.layer.{layer}."
        for part in ("query", "key", "value"):
            _linear(out, name + f"attention.self.{part}", fill, hidden, hidden)
        _linear(out, name + "attention.output.dense", fill, hidden, hidden)
        _norm(out, name + "attention.output.LayerNorm", fill, hidden)
        if layer >= (shape.fusion_layer if cross_from is None else cross_from):
            _linear(out, name + "crossattention.self.query", fill, hidden, hidden)
            for part in ("key", "value"):
                _linear(out, name + f"crossattention.self.{part}", fill, hidden, cross_width or vision_width)
            _linear(out, name + "crossattention.output.dense", fill, hidden, hidden)
            _norm(out, name + "crossattention.output.LayerNorm", fill, hidden)
        _linear(out, name + "intermediate.dense", fill, shape.intermediate, hidden)
        _linear(out, name + "output.dense", fill, hidden, shape.intermediate)
        _norm(out, name + "output.LayerNorm", fill, hidden)
    if mlm_head:
        bias = fill(shape.vocab)
        out[f"{prefix}cls.predictions.bias"] = bias
        _linear(out, f"{prefix}cls.predictions.transform.dense", fill, hidden, hidden)
        _norm(out, f"{prefix}cls.predictions.transform.LayerNorm", fill, hidden)
        out[f"{prefix}cls.predictions.decoder.weight"] = words      # tied, as HF ties them
        out[f"{prefix}cls.predictions.decoder.bias"] = bias
    return out


def mlp_head(name: str, fill: Filler, hidden: int, outputs: int) -> dict:
    """X-VLM's ``build_mlp``: Linear(H, 2H) -> LayerNorm -> GELU -> Linear(2H, outputs)."""
    out: dict = {}
    _linear(out, f"{name}.0", fill, 2 * hidden, hidden)
    _norm(out, f"{name}.1", fill, 2 * hidden)
    _linear(out, f"{name}.3", fill, outputs, 2 * hidden)
    return out


def released_state(text: TextShape, vision: SwinShape | ViTShape, *, layout: str = "pretrain", embed: int = 32,
                   seed: int = 0) -> dict:
    """The ``model`` state of a released X-VLM file: ``layout`` pretrain (XVLM of model_pretrain.py), retrieval,
    bbox (grounding), vqa, nlvr (fine-tuned, doubled fusion layers), captioning (text decoder only)."""
    fill = Filler(seed)
    state = swin_state(vision, fill) if isinstance(vision, SwinShape) else vit_state(vision, fill)
    hidden = text.hidden
    if layout == "captioning":
        state |= bert_state(text, vision.width, fill, "text_decoder.", mlm_head=True)
        return state
    if layout == "nlvr":
        doubled = text.fusion_layer + 2 * (text.layers - text.fusion_layer)
        encoder = bert_state(text, vision.width, fill, "text_encoder.", mlm_head=False, layers=doubled)
        for layer in range(text.fusion_layer, doubled, 2):  # key/value of a pair's two blocks are one module
            for part in ("key", "value"):
                for kind in ("weight", "bias"):
                    name = f"text_encoder.encoder.layer.{{}}.crossattention.self.{part}.{kind}"
                    encoder[name.format(layer)] = encoder[name.format(layer + 1)]
        return state | encoder | mlp_head("cls_head", fill, hidden, 2)
    state |= bert_state(text, vision.width, fill, "text_encoder.", mlm_head=layout == "pretrain")
    if layout in ("pretrain", "retrieval"):
        state["vision_proj.weight"], state["vision_proj.bias"] = fill(embed, vision.width), fill(embed)
        state["text_proj.weight"], state["text_proj.bias"] = fill(embed, hidden), fill(embed)
        state["temp"] = torch.tensor(0.07)
        state |= mlp_head("itm_head", fill, hidden, 2)
    if layout in ("pretrain", "bbox"):
        state |= mlp_head("bbox_head", fill, hidden, 4)
    if layout == "vqa":
        state |= bert_state(text, vision.width, fill, "text_decoder.", mlm_head=True,
                            layers=text.layers - text.fusion_layer, cross_from=0, cross_width=hidden)
    return state
