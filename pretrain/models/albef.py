"""The ALBEF backbone: both towers, the contrastive projections, the ITM head, the temperature; ALBEF key maps.

``ALBEFModel`` takes built encoders (no configs, no disk access); ``build_albef`` builds them from a
timm name and a LOCAL BERT config; weights load only in ``load_pretrained_encoders``. Parameter names
are those of ALBEF's released checkpoints (``visual_encoder.*``, ``text_encoder.bert.*``,
``text_encoder.cls.*``, ``vision_proj``, ``text_proj``, ``itm_head``, ``temp``)::

    model = build_albef("vit_base_patch16_224", 256, "bert-base-uncased/", fusion_layer=6)
    reports = load_pretrained_encoders(model, vision_weights="deit_base.pth", bert_dir="bert-base-uncased/")
    encoded = model.encode(images, input_ids, attention_mask)       # .image_tokens, .image_feat, .text_hidden, ...
    itm_logits = model.itm_head(model.fused_cls(encoded.text_hidden, attention_mask, encoded.image_tokens))

A released ``ALBEF.pth`` loads with::

    model_state, momentum_state, queue_state = from_albef_state_dict(torch.load(path)["model"])
    model.load_state_dict(model_state)   # strict; momentum copies and queues go to the objectives

Losses, momentum copies and queues live in ``pretrain/objectives``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.importers.vicha import from_vicha_state_dict, is_vicha_layout
from pretrain.models.concepts import ConceptEncoder, build_concept_encoder, copy_text_layers
from pretrain.models.encoded import FINAL_ONLY, TOWERS, Encoded, Wants, concept_tokens, encode
from pretrain.models.swin import build_swin_encoder, is_swin, load_swin_weights
from pretrain.models.text import FusionBert, load_bert_config, load_text_weights
from pretrain.models.vision import VisionEncoder, build_vision_encoder, interpolate_pos_embed, load_vision_weights

# Buffers of ALBEF's feature queues (``idx_queue`` only in retrieval checkpoints).
QUEUE_KEYS = ("image_queue", "text_queue", "queue_ptr", "idx_queue")
POSITION_IDS_SUFFIX = ".embeddings.position_ids"


class ALBEFModel(nn.Module):
    """The ALBEF backbone around a built ``VisionEncoder`` and ``FusionBert``; heads on their [CLS] tokens.

    ``concept_encoder`` (ViCHA) turns each image's concept words into extra ViT tokens; the image methods
    then take ``concepts=(concept_ids, concept_mask)``. Without it the model is ALBEF's, key for key.
    """

    def __init__(
        self, visual_encoder: VisionEncoder, text_encoder: FusionBert, embed_dim: int = 256, temp: float = 0.07,
        itm_head: str = "linear", local_attn_depth: int = 4,
        concept_encoder: ConceptEncoder | None = None,
    ):
        super().__init__()
        if text_encoder.encoder_width != visual_encoder.width:
            raise ValueError(
                f"text encoder cross-attends to width {text_encoder.encoder_width}, "
                f"but the vision encoder's tokens have width {visual_encoder.width}"
            )
        self.visual_encoder = visual_encoder
        self.text_encoder = text_encoder
        self.vision_proj = nn.Linear(visual_encoder.width, embed_dim)
        self.text_proj = nn.Linear(text_encoder.hidden_size, embed_dim)
        self.itm_head = build_itm_head(itm_head, text_encoder.hidden_size)
        # X-VLM's region features: how many of the last ViT blocks a region's copy runs restricted to its box
        # (pretrain.objectives.region_encoding); a setting, not a weight.
        self.local_attn_depth = local_attn_depth
        # 0-d, as in ALBEF, so checkpoints exchange it without reshaping.
        # Shape [1], not ALBEF's 0-d: DeepSpeed's parameter broadcast cannot view a 0-d tensor as
        # bytes. The key maps below convert at the checkpoint boundary.
        self.temp = nn.Parameter(torch.tensor([float(temp)]))
        # Registered last, so ALBEF's parameters keep their order whether or not a model reads concepts.
        self.concept_encoder = concept_encoder

    def encode(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               wants: Wants = FINAL_ONLY, concepts: tuple[torch.Tensor, torch.Tensor] | None = None) -> Encoded:
        """Both towers on one batch, as the record every objective reads (``pretrain.models.encoded``)."""
        return encode(self, images, input_ids, attention_mask, wants, concepts)

    def image_tokens(self, images: torch.Tensor,
                     concepts: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``images`` [B, 3, H, W] -> tokens [B, 1+N(+E), D]: the image tower's output, concept tokens last."""
        extra = concept_tokens(self, concepts)
        if extra is None:
            return self.visual_encoder(images)
        return self.visual_encoder.encode(images, extra_tokens=extra).tokens

    def image_embeddings(
        self, images: torch.Tensor, concepts: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``images`` [B, 3, H, W] -> (tokens [B, 1+N(+E), D], L2-normalised projected CLS [B, embed_dim])."""
        tokens = self.image_tokens(images, concepts)
        return tokens, F.normalize(self.vision_proj(tokens[:, 0]), dim=-1)

    def text_embeddings(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Text-only layers: (hidden [B, T, H], L2-normalised projected CLS [B, embed_dim])."""
        hidden = self.text_encoder.encode_text(input_ids, attention_mask)
        return hidden, F.normalize(self.text_proj(hidden[:, 0]), dim=-1)

    def fused_cls(
        self, text_hidden: torch.Tensor, attention_mask: torch.Tensor, image_tokens: torch.Tensor
    ) -> torch.Tensor:
        """Fused [CLS] state [B, H] of text states attending to every image token (ITM and task heads read it)."""
        return self.text_encoder.fuse(text_hidden, attention_mask, image_tokens)[:, 0]

    @torch.no_grad()
    def clamp_temperature(self, low: float = 0.001, high: float = 0.5) -> None:
        """Clamp ``temp`` in place, as ALBEF pretraining does at the start of each forward."""
        self.temp.clamp_(low, high)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Activation checkpointing per block in both towers."""
        self.visual_encoder.set_grad_checkpointing(enabled)
        self.text_encoder.set_grad_checkpointing(enabled)
        if self.concept_encoder is not None:
            self.concept_encoder.set_grad_checkpointing(enabled)


def build_itm_head(kind: str, hidden_size: int) -> nn.Module:
    """ALBEF's ITM head (``linear``: one Linear to 2 classes) or X-VLM's (``mlp``: Linear(H, 2H) -> LayerNorm ->
    GELU -> Linear(2H, 2), whose state-dict names ``0.*``, ``1.*``, ``3.*`` are X-VLM's ``itm_head.*``)."""
    if kind == "linear":
        return nn.Linear(hidden_size, 2)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(hidden_size, 2 * hidden_size), nn.LayerNorm(2 * hidden_size), nn.GELU(),
                             nn.Linear(2 * hidden_size, 2))
    raise ValueError(f"unknown ITM head {kind!r}; use linear (ALBEF) or mlp (X-VLM)")


def build_albef(
    vision_name: str,
    image_size: int,
    bert_dir: str,
    fusion_layer: int,
    embed_dim: int = 256,
    vision_overrides: dict | None = None,
    text_overrides: dict | None = None,
    temp: float = 0.07,
    with_mlm_head: bool = True,
    itm_head: str = "linear",
    local_attn_depth: int = 4,
    concept_layers: int = 0,
) -> ALBEFModel:
    """A randomly initialised ALBEF model from a timm name (a ViT, or a Swin for X-VLM) and the config.json of a
    LOCAL BERT directory.

    ``concept_layers`` > 0 adds ViCHA's concept encoder, its layers copied from the text encoder's first ones.
    """
    if is_swin(vision_name):
        visual_encoder = build_swin_encoder(vision_name, image_size, **(vision_overrides or {}))
    else:
        visual_encoder = build_vision_encoder(vision_name, image_size, **(vision_overrides or {}))
    config = load_bert_config(bert_dir, **(text_overrides or {}))
    text_encoder = FusionBert(config, fusion_layer, encoder_width=visual_encoder.width, with_mlm_head=with_mlm_head)
    model = ALBEFModel(visual_encoder, text_encoder, embed_dim=embed_dim, temp=temp, itm_head=itm_head,
                       local_attn_depth=local_attn_depth)
    if concept_layers:  # built last, so the other parameters start as they would in ALBEF under the same seed
        model.concept_encoder = build_concept_encoder(config, concept_layers, visual_encoder.width)
        copy_text_layers(model.concept_encoder, text_encoder)
    return model


def load_pretrained_encoders(model: ALBEFModel, *, vision_weights: str | None, bert_dir: str | None) -> dict:
    """Load unimodal pretrained weights into both towers; a tower given None keeps its initialisation.

    Returns ``{"vision": LoadReport | None, "text": LoadReport | None}``. A concept encoder is initialised
    again from the loaded text encoder's first layers (ViCHA loads both from the same BERT).
    """
    load_vision = load_swin_weights if not isinstance(model.visual_encoder, VisionEncoder) else load_vision_weights
    reports = {
        "vision": load_vision(model.visual_encoder, vision_weights) if vision_weights else None,
        "text": load_text_weights(model.text_encoder, bert_dir) if bert_dir else None,
    }
    if bert_dir and model.concept_encoder is not None:
        copy_text_layers(model.concept_encoder, model.text_encoder)
    return reports


def _momentum_module(key: str) -> str | None:
    head = key.split(".", 1)[0]
    if head.endswith("_m") and head[: -len("_m")] in TOWERS:
        return head
    return None


def from_albef_state_dict(state_dict: dict, num_patches: int | None = None) -> tuple[dict, dict, dict]:
    """Split an ALBEF checkpoint's ``model`` dict into (model, momentum, queue) dicts in our names.

    - model: loads strictly into ``ALBEFModel``. ``*.embeddings.position_ids`` (a buffer that HF no
      longer saves) is dropped; fine-tuned checkpoints that store the text encoder without ``bert.``
      (``text_encoder.encoder.layer...``, ALBEF retrieval/VE/grounding) get it back.
    - momentum: the ``<module>_m.*`` copies, keyed by the ONLINE name (``visual_encoder.*``...), so
      they load into a copy of the online modules.
    - queue: ``image_queue``, ``text_queue``, ``queue_ptr`` (and ``idx_queue``), unchanged.
    ``num_patches`` interpolates both ``pos_embed`` to a new image size (e.g. 256 px -> 384 px).
    A ``{"model": ...}`` wrapper is unwrapped; a state in ViCHA's layout is mapped by
    ``pretrain.importers.vicha`` first. Other keys (e.g. ``text_decoder.*``) stay in ``model``
    so that a strict load names them.
    """
    if isinstance(state_dict.get("model"), dict):
        state_dict = state_dict["model"]
    if is_vicha_layout(state_dict):  # a released ViCHA file: its concept encoder and heads renamed to ours first
        state_dict, _report = from_vicha_state_dict(state_dict)
    model_state, momentum_state, queue_state = {}, {}, {}
    for key, value in state_dict.items():
        if key in QUEUE_KEYS:
            queue_state[key] = value
            continue
        if key.endswith(POSITION_IDS_SUFFIX):
            continue
        momentum_module = _momentum_module(key)
        target = momentum_state if momentum_module else model_state
        if momentum_module:
            key = momentum_module[: -len("_m")] + key[len(momentum_module) :]
        if key.startswith("text_encoder.") and not key.startswith(("text_encoder.bert.", "text_encoder.cls.")):
            key = "text_encoder.bert." + key[len("text_encoder.") :]
        if key == "visual_encoder.pos_embed" and num_patches is not None:
            value = interpolate_pos_embed(value, num_patches)
        if key == "temp":
            value = value.reshape(1)
        target[key] = value
    return model_state, momentum_state, queue_state


def to_albef_state_dict(model_state: dict, momentum_state: dict | None = None, queue_state: dict | None = None) -> dict:
    """The inverse of ``from_albef_state_dict``: one dict in ALBEF's ``model`` layout.

    Our parameter names already are ALBEF's; momentum keys get the ``_m`` module suffix back, and
    ``text_encoder[_m].bert.embeddings.position_ids`` is re-created because ALBEF's code (transformers
    4.8) loads strictly and expects it.
    """
    albef_state = dict(model_state)
    if "temp" in albef_state:
        albef_state["temp"] = albef_state["temp"].reshape(())
    for key, value in (momentum_state or {}).items():
        module, rest = key.split(".", 1)
        if module not in TOWERS:
            raise ValueError(f"momentum key {key!r} is not under one of {TOWERS}")
        albef_state[f"{module}_m.{rest}"] = value
    albef_state.update(queue_state or {})
    for prefix in ("text_encoder", "text_encoder_m"):
        positions = albef_state.get(f"{prefix}.bert.embeddings.position_embeddings.weight")
        if positions is not None:
            albef_state[f"{prefix}.bert{POSITION_IDS_SUFFIX}"] = torch.arange(positions.shape[0]).unsqueeze(0)
    return albef_state
