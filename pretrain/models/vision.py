"""The image tower: a timm Vision Transformer that returns every token, the steps other methods need, its weight loader.

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

Beyond ALBEF's plain forward, objectives of other methods ask the encoder for more, through a few
composable steps (``embed`` -> ``run_blocks`` -> the final ``norm``) or the one-call ``encode``::

    out = encoder.encode(images, layers=(7, 8, 9, 10, 11), norm_layers=True)   # ViCHA's hierarchical ITC
    out = encoder.encode(images, extra_tokens=concepts)                        # ViCHA's visual concepts
    out = encoder.encode(images, keep=kept_patch_indices)                      # MAE: a subset of patches
    out = encoder.encode_regions(images, image_index, masks, masked_blocks=4)  # X-VLM's region features
    out.tokens, out.layers[7], out.grid, out.region_tokens

``encode(images)`` with no options is ``forward(images)`` bit for bit, and none of this adds state, so
ALBEF's behaviour and checkpoints are untouched. Region attention masks come from ``pretrain.models.regions``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import timm
import torch
import torch.nn.functional as F
from timm.models import checkpoint
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from pretrain.models import LoadReport, read_state_dict


@dataclass(frozen=True)
class VisionOutput:
    """What ``VisionEncoder.encode`` / ``encode_regions`` return for a batch of images.

    Token layout along dimension 1, in every tensor here: the prefix token (CLS), then the patches (all
    of them in row-major grid order, or the kept ones in the order ``keep`` lists them), then the extra
    tokens in the order given.
    """

    tokens: torch.Tensor  # [B, S, D] after the final norm; tokens[:, 0] is the CLS token
    layers: dict[int, torch.Tensor]  # chosen states [B, S, D] by index: 0 = embeddings, i = output of block i
    grid: tuple[int, int]  # patch grid (rows, columns) of these images
    region_tokens: torch.Tensor | None = None  # [R, S, D] after the final norm, from encode_regions only


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

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid (rows, columns) at the built image size ((16, 16) for 256 px with patch 16)."""
        rows, columns = self.patch_embed.grid_size
        return rows, columns

    @property
    def patch_size(self) -> tuple[int, int]:
        """Patch (height, width) in pixels of the image the encoder sees."""
        height, width = self.patch_embed.patch_size
        return height, width

    def embed(
        self, images: torch.Tensor, *, keep: torch.Tensor | None = None, extra_tokens: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``images`` [B, 3, H, W] -> the sequence the first block reads, [B, S, D] (state 0 of ``run_blocks``).

        Without options this is timm's own embedding (patches, CLS, position embeddings, timm's patch
        dropout and pre-norm): [B, 1+N, D].

        ``keep`` [B, K] (int64 patch indices in 0..N-1, row-major) keeps only those patches per sample, in
        that order, after the position embedding, so each kept patch carries its own position; CLS always
        stays first (MAE's encoder input): [B, 1+K, D]. CLS keeps its position embedding too, as in MAE and
        the plain forward (ViCHA's MAE pass prepends the bare ``cls_token``).

        ``extra_tokens`` [B, E, D] are appended after everything else, as given: no position embedding,
        no pre-norm (ViCHA's visual-concept tokens): every block then sees [CLS, patches, extra].
        """
        if keep is not None and not isinstance(self.patch_drop, nn.Identity):
            raise ValueError(
                "keep= selects patches, but this encoder also drops patches at random (timm's patch_drop_rate); "
                "build it without patch_drop_rate to choose the kept patches explicitly"
            )
        tokens = self.patch_embed(images)
        tokens = self._pos_embed(tokens)
        tokens = self.patch_drop(tokens)
        tokens = self.norm_pre(tokens)
        if keep is not None:
            tokens = self._keep_patches(tokens, keep)
        if extra_tokens is not None:
            if (
                extra_tokens.ndim != 3
                or extra_tokens.shape[0] != tokens.shape[0]
                or extra_tokens.shape[2] != self.width
            ):
                raise ValueError(
                    f"extra_tokens must be [batch, tokens, width] = [{tokens.shape[0]}, E, {self.width}]; "
                    f"got {tuple(extra_tokens.shape)}: project them to the encoder width, one row per image"
                )
            tokens = torch.cat([tokens, extra_tokens.to(tokens.dtype)], dim=1)
        return tokens

    def run_blocks(
        self,
        tokens: torch.Tensor,
        start: int = 0,
        stop: int | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        layers: Iterable[int] = (),
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Run blocks ``start+1 .. stop`` (1-based; ``self.blocks[start:stop]``) on ``tokens``, state ``start``.

        Returns the state ``stop`` [B, S, D] (before the final norm) and the chosen ``layers`` among
        states ``start .. stop`` (``start`` is the input itself), by index.

        ``attention_mask`` [B, S] bool, True where a token may be attended, restricts the KEYS of every
        query in every block run here (X-VLM's region attention: queries outside the box still run, they
        read only the allowed keys). Each row needs at least one True; CLS is kept attendable by
        ``pretrain.models.regions.region_attention_mask``. With timm's gradient checkpointing on, each
        block is checkpointed, masked or not.
        """
        depth = len(self.blocks)
        stop = depth if stop is None else stop
        if not 0 <= start <= stop <= depth:
            raise ValueError(
                f"run_blocks needs 0 <= start <= stop <= {depth} (the encoder's depth); got {start}, {stop}"
            )
        wanted = set(layers)
        outside = sorted(index for index in wanted if not start <= index <= stop)
        if outside:
            raise ValueError(
                f"layers {outside} are not states this call produces: blocks {start + 1}..{stop} give states "
                f"{start}..{stop} (0 = embeddings, i = output of block i, up to {depth})"
            )
        key_mask = None if attention_mask is None else self._key_mask(attention_mask, tokens)
        states = {start: tokens} if start in wanted else {}
        for index in range(start, stop):
            block = self.blocks[index]
            inputs = (tokens,) if key_mask is None else (tokens, key_mask)
            if self.grad_checkpointing and not torch.jit.is_scripting():
                tokens = checkpoint(block, *inputs)
            else:
                tokens = block(*inputs)
            if index + 1 in wanted:
                states[index + 1] = tokens
        return tokens, states

    def encode(
        self,
        images: torch.Tensor,
        *,
        layers: Iterable[int] = (),
        norm_layers: bool = False,
        extra_tokens: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
    ) -> VisionOutput:
        """All blocks on ``images`` [B, 3, H, W]: final tokens, chosen layer states and the patch grid.

        ``layers`` index states like Hugging Face ``hidden_states``: 0 is ``embed``'s output, i the output
        of block i (1-based), full token states [B, S, D] so a caller takes CLS or pools. They are taken
        before the final norm unless ``norm_layers``, which applies the encoder's final norm to each, as
        ViCHA does: ViCHA's ViT keeps ``norm(x)`` after every block and its hierarchical ITC reads
        ``image_hidden_states[-6:-1]``, i.e. blocks 7..11 of a 12-block ViT-B: ``layers=(7, 8, 9, 10, 11),
        norm_layers=True`` here. ``extra_tokens`` and ``keep`` are ``embed``'s options.

        With no options this is ``forward(images)`` bit for bit.
        """
        tokens = self.embed(images, keep=keep, extra_tokens=extra_tokens)
        hidden, states = self.run_blocks(tokens, layers=layers)
        if norm_layers:
            states = {index: self.norm(state) for index, state in states.items()}
        return VisionOutput(tokens=self.norm(hidden), layers=states, grid=self._grid_of(images))

    def encode_regions(
        self,
        images: torch.Tensor,
        image_index: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        masked_blocks: int,
        extra_tokens: torch.Tensor | None = None,
    ) -> VisionOutput:
        """X-VLM's region features: whole images as ``encode`` gives them, plus one token sequence per region.

        ``image_index`` [R] (int64) names the image of each region (X-VLM's ``idx_to_group_img``);
        ``attention_mask`` [R, S] bool is each region's key mask (``region_attention_mask``). Each image
        runs the first ``depth - masked_blocks`` blocks once; its state is copied for each of its regions,
        and the copies run the last ``masked_blocks`` blocks (X-VLM's ``local_attn_depth``, 4 for ViT-B)
        with attention restricted to the mask, while the images run them unrestricted. Both get the
        final norm. ``region_tokens[:, 0]`` is the region feature; the same mask restricts the text
        encoder's cross-attention to the region.
        """
        depth = len(self.blocks)
        if not 1 <= masked_blocks <= depth:
            raise ValueError(f"masked_blocks must be in 1..{depth} (the encoder's depth); got {masked_blocks}")
        if image_index.ndim != 1 or image_index.dtype != torch.long:
            raise ValueError(
                f"image_index must be a 1-D int64 tensor, one image number per region; "
                f"got {image_index.dtype} of shape {tuple(image_index.shape)}"
            )
        if image_index.numel() and (image_index.min() < 0 or image_index.max() >= images.shape[0]):
            raise ValueError(
                f"image_index values must name one of the {images.shape[0]} images (0..{images.shape[0] - 1})"
            )
        branch = depth - masked_blocks
        shared, _ = self.run_blocks(self.embed(images, extra_tokens=extra_tokens), 0, branch)
        whole, _ = self.run_blocks(shared, branch, depth)
        regions, _ = self.run_blocks(shared[image_index], branch, depth, attention_mask=attention_mask)
        return VisionOutput(
            tokens=self.norm(whole), layers={}, grid=self._grid_of(images), region_tokens=self.norm(regions)
        )

    def _grid_of(self, images: torch.Tensor) -> tuple[int, int]:
        rows, columns = self.patch_embed.dynamic_feat_size(tuple(images.shape[-2:]))
        return rows, columns

    def _keep_patches(self, tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        prefix, patches = tokens[:, : self.num_prefix_tokens], tokens[:, self.num_prefix_tokens :]
        if keep.dtype != torch.long or keep.ndim != 2 or keep.shape[0] != tokens.shape[0]:
            raise ValueError(
                f"keep must be an int64 tensor [batch, kept] = [{tokens.shape[0]}, K] of patch indices; "
                f"got {keep.dtype} of shape {tuple(keep.shape)}"
            )
        if keep.numel() and (keep.min() < 0 or keep.max() >= patches.shape[1]):
            raise ValueError(
                f"keep holds patch indices outside 0..{patches.shape[1] - 1}: "
                f"these images have {patches.shape[1]} patches each"
            )
        kept = patches.gather(1, keep.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        return torch.cat([prefix, kept], dim=1)

    @staticmethod
    def _key_mask(attention_mask: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        if attention_mask.dtype != torch.bool or attention_mask.shape != tokens.shape[:2]:
            raise ValueError(
                f"attention_mask must be a bool tensor [batch, tokens] = {list(tokens.shape[:2])}, True where a "
                f"token may be attended; got {attention_mask.dtype} of shape {tuple(attention_mask.shape)} "
                "(pretrain.models.regions.region_attention_mask builds it)"
            )
        if not attention_mask.any(dim=1).all():
            empty = torch.nonzero(~attention_mask.any(dim=1)).flatten().tolist()
            raise ValueError(f"attention_mask rows {empty[:8]} allow no token at all; keep at least CLS attendable")
        # One row per sample, the same for every head and every query: a mask on keys only, as in X-VLM.
        return attention_mask[:, None, None, :]


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
