"""The image tower: a timm Vision Transformer that returns every token, and its explicit weight loader.

ALBEF keeps all ViT tokens (CLS first) after the final norm: the CLS token feeds the contrastive
projection and every token is a key/value for the text encoder's cross-attention. The module IS the
timm model (no wrapper prefix), so its state dict has timm's names, which are ALBEF's
``visual_encoder.*`` names (``cls_token``, ``pos_embed``, ``patch_embed.proj.*``, ``blocks.N.*``, ``norm.*``)::

    encoder = build_vision_encoder("vit_base_patch16_224", 256)          # ViT-B/16 at 256 px, random init
    report = load_vision_weights(encoder, "deit_base_patch16_224-b5f2ef4d.pth")  # pos_embed 14x14 -> 16x16
    tokens = encoder(images)                                              # [B, 1 + 256, 768]

Tiny encoders for tests and the demo pass timm overrides::

    build_vision_encoder("vit_tiny_patch16_224", 64, embed_dim=64, depth=2, num_heads=2)

Nothing is ever downloaded: weights come only from a local file given to ``load_vision_weights``.
"""

from __future__ import annotations

import math

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from pretrain.models import LoadReport, read_state_dict


class VisionEncoder(VisionTransformer):
    """timm's ``VisionTransformer`` whose forward returns all tokens ``[B, 1+N, D]`` after the final norm.

    Instances are made by ``build_vision_encoder``, which builds the timm model by name and then gives
    it this class: a subclass that adds no state, so names, weights and timm's own methods are unchanged.
    """

    @property
    def width(self) -> int:
        """Token width D (768 for ViT-B)."""
        return self.embed_dim

    @property
    def num_patches(self) -> int:
        """Patch tokens per image at the built image size (256 for 256 px with patch 16)."""
        return self.patch_embed.num_patches

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block in backward instead of storing its activations (timm's per-block checkpoint)."""
        super().set_grad_checkpointing(enabled)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` [B, 3, H, W] -> tokens [B, 1+N, D], CLS first."""
        return self.forward_features(images)


def build_vision_encoder(name: str, image_size: int, **overrides) -> VisionEncoder:
    """A randomly initialised timm ViT by name, at ``image_size``, returning tokens; never downloads.

    ``overrides`` go to ``timm.create_model`` (``embed_dim``, ``depth``, ``num_heads``, ``drop_path_rate``...).
    Only plain ViT-family names are supported (ViT, DeiT without distillation token, CLIP ViT).
    """
    try:
        model = timm.create_model(
            name, pretrained=False, img_size=image_size, num_classes=0, global_pool="", **overrides
        )
    except (RuntimeError, AssertionError, TypeError) as error:  # unknown name, or options the model lacks
        raise ValueError(f"cannot build timm model {name!r} as a token encoder: {error}") from None
    if type(model) is not VisionTransformer:
        raise ValueError(
            f"timm model {name!r} is a {type(model).__name__}; the vision encoder supports plain "
            "VisionTransformer names (vit_*, deit_* without distillation, vit_*_clip_*)"
        )
    if not model.has_class_token:
        raise ValueError(f"timm model {name!r} has no class token; ALBEF projects the CLS token")
    # Give the built timm model the subclass in place: timm builds by name through its registry, so the
    # class cannot be passed in, and a stateless subclass keeps every name and weight as timm made them.
    model.__class__ = VisionEncoder
    # timm turns fused attention off under an environment switch or export mode; ALBEF training wants
    # PyTorch SDPA (flash / memory-efficient kernels on GPU), so it is set explicitly on every block.
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = True
    return model


def interpolate_pos_embed(pos_embed: torch.Tensor, num_patches_new: int, num_prefix_tokens: int = 1) -> torch.Tensor:
    """ALBEF's rule for a new image size: prefix (CLS) positions kept, the square patch grid resized bicubically.

    ``pos_embed`` [1, prefix + s*s, D] -> [1, prefix + num_patches_new, D]; returned unchanged when the
    grid already has ``num_patches_new`` positions.
    """
    num_patches_old = pos_embed.shape[1] - num_prefix_tokens
    if num_patches_old == num_patches_new:
        return pos_embed
    side_old, side_new = math.isqrt(num_patches_old), math.isqrt(num_patches_new)
    if side_old * side_old != num_patches_old or side_new * side_new != num_patches_new:
        raise ValueError(
            f"position embedding grids must be square: {num_patches_old} -> {num_patches_new} patch positions"
        )
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    width = pos_embed.shape[-1]
    grid = grid.reshape(1, side_old, side_old, width).permute(0, 3, 1, 2)
    # Interpolate in float32: bicubic is not implemented for every half type on every device.
    grid = F.interpolate(grid.float(), size=(side_new, side_new), mode="bicubic", align_corners=False)
    grid = grid.to(pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, side_new * side_new, width)
    return torch.cat([prefix, grid], dim=1)


def load_vision_weights(encoder: VisionEncoder, path: str, *, strict: bool = True) -> LoadReport:
    """Load a local ViT checkpoint (timm or DeiT names, e.g. ALBEF's DeiT-B/16 init) into ``encoder``.

    The classifier ``head.*`` is dropped and ``pos_embed`` is interpolated to the encoder's image size.
    A tensor whose shape still differs is an error that lists every such key. With ``strict`` (the
    default) a missing or unexpected key is an error too; without it they are only reported.
    """
    state_dict = read_state_dict(path)
    dropped = tuple(sorted(key for key in state_dict if key.startswith("head.")))
    state_dict = {key: value for key, value in state_dict.items() if key not in dropped}

    resized = ()
    if "pos_embed" in state_dict and state_dict["pos_embed"].shape != encoder.pos_embed.shape:
        prefix_positions = 0 if encoder.no_embed_class else encoder.num_prefix_tokens
        old = state_dict["pos_embed"]
        if old.ndim == 3 and old.shape[-1] == encoder.pos_embed.shape[-1]:
            state_dict["pos_embed"] = interpolate_pos_embed(old, encoder.num_patches, prefix_positions)
            resized = ("pos_embed",)

    own = encoder.state_dict()
    mismatched = [
        f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}"
        for key, value in state_dict.items()
        if key in own and value.shape != own[key].shape
    ]
    if mismatched:
        raise ValueError(f"{path!r} does not fit the vision encoder; shape mismatches:\n  " + "\n  ".join(mismatched))
    missing = tuple(sorted(set(own) - set(state_dict)))
    unexpected = tuple(sorted(set(state_dict) - set(own)))
    if strict and (missing or unexpected):
        raise ValueError(
            f"{path!r} does not match the vision encoder (pass strict=False to load what fits):\n"
            f"  missing: {list(missing)}\n  unexpected: {list(unexpected)}"
        )
    encoder.load_state_dict(state_dict, strict=False)
    return LoadReport(missing=missing, unexpected=unexpected, dropped=dropped, resized=resized)
