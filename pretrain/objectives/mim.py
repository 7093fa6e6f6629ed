"""Masked image modelling (ViCHA's unimodal MAE): reconstruct the pixels of masked patches from the visible ones.

ViCHA (reference/methods.md section 2; its ``models/objectives/mae.py``, after MAE) runs a second pass of the
SAME ViT, without concept tokens, on a random subset of each image's patches, and a small decoder rebuilds
every patch:

1. ``random_masking``: per image, uniform noise over the N patches, ``argsort``; the first
   ``int(N * (1 - mask_ratio))`` of that order are kept (in that order), the rest masked. ``mask`` [B, N] is 1
   where a patch is masked; ``restore`` puts the shuffled order back.
2. Encoder: patch embedding + position embedding, the kept patches only, the bare ``cls_token`` in front
   (ViCHA adds no position embedding to it; ``cls_position: true`` gives it its position as MAE does), all
   blocks, the final norm.
3. Decoder: ``decoder_embed`` (Linear to the decoder width), a learnable ``mask_token`` for every masked
   patch, the shuffled order undone, fixed 2-D sin-cos positions (zero for [CLS]) added, ``decoder_blocks``
   (pre-norm ViT blocks, LayerNorm eps 1e-6), ``decoder_norm`` (eps 1e-5), ``mae_proj`` to ``p * p * 3`` values.
4. Loss: the normalised input image cut into patches (``patchify``: each patch as its rows, columns,
   channels), each patch normalised by its own mean and variance (``(x - mean) / sqrt(var + 1e-6)``,
   unbiased variance, as MAE's ``norm_pix_loss``), squared error averaged per patch, then over the masked
   patches only.

The mask draws from the process's torch generator, which the loop seeds per rank and saves in every
checkpoint (``client_state["rng"]``), so a resumed run masks exactly as the uninterrupted one; pass a
``torch.Generator`` to ``random_masking`` to draw from another. ViCHA's configuration: ``mask_ratio`` 0.75,
decoder depth 2, width 768, 16 heads, MLP ratio 4::

    objectives: {mim: {mask_ratio: 0.75, decoder_depth: 2, decoder_width: 768, decoder_heads: 16}}

Tests: ``.venv/bin/python -m pytest -q tests/pretrain/objectives/test_mim.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from timm.models.vision_transformer import Block
from torch import nn

from pretrain.config import ConfigError, require, require_at_least
from pretrain.models.encoded import Encoded
from pretrain.objectives.base import BuildContext, Objective, StepContext


def random_masking(batch_size: int, patches: int, mask_ratio: float, device: torch.device | str | None = None,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(keep [B, K], mask [B, N], restore [B, N])`` for MAE's per-sample shuffle (see the module docstring).

    ``keep`` lists the kept patch indices in the shuffled order, ``mask`` is 1.0 at masked patches (in grid
    order), ``restore`` is the inverse permutation of the shuffle.
    """
    kept = int(patches * (1 - mask_ratio))
    if kept < 1:
        raise ValueError(f"mask_ratio {mask_ratio} keeps no patch of {patches}; lower it")
    noise = torch.rand(batch_size, patches, device=device, generator=generator)
    shuffle = torch.argsort(noise, dim=1)
    restore = torch.argsort(shuffle, dim=1)
    mask = torch.ones(batch_size, patches, device=noise.device)
    mask[:, :kept] = 0
    return shuffle[:, :kept], torch.gather(mask, 1, restore), restore


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, (H/p)(W/p), p * p * C]``: patches in row-major grid order, each as rows, columns,
    channels (MAE's and ViCHA's layout)."""
    batch, channels, height, width = images.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"images of {height}x{width} px do not split into {patch_size}-px patches")
    rows, columns = height // patch_size, width // patch_size
    patches = images.reshape(batch, channels, rows, patch_size, columns, patch_size)
    return torch.einsum("bchpwq->bhwpqc", patches).reshape(batch, rows * columns, patch_size * patch_size * channels)


def masked_patch_loss(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                      normalise_target: bool = True) -> torch.Tensor:
    """Mean squared error per patch, averaged over the masked patches (``mask`` 1); fp32."""
    prediction, target = prediction.float(), target.float()
    if normalise_target:
        mean = target.mean(dim=-1, keepdim=True)
        variance = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (variance + 1.0e-6) ** 0.5
    per_patch = ((prediction - target) ** 2).mean(dim=-1)
    mask = mask.float()
    return (per_patch * mask).sum() / mask.sum()


def sincos_positions(width: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embeddings ``[1 + grid * grid, width]``, a zero row for [CLS] first (MAE's
    ``get_2d_sincos_pos_embed``: half the channels encode the column, half the row, each as sin then cos)."""
    if width % 4:
        raise ValueError(f"sin-cos positions need a width divisible by 4, got {width}")
    coordinates = torch.arange(grid, dtype=torch.float64)
    columns, rows = torch.meshgrid(coordinates, coordinates, indexing="xy")  # MAE's meshgrid(w, h)

    def one_axis(positions: torch.Tensor) -> torch.Tensor:
        frequencies = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width / 4))
        angles = positions.reshape(-1)[:, None] * frequencies[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    table = torch.cat([one_axis(columns), one_axis(rows)], dim=1)
    return torch.cat([torch.zeros(1, width, dtype=torch.float64), table]).float()


@dataclass(frozen=True)
class MaskedImageModellingConfig:
    """``objectives.mim`` options (ViCHA: ``mask_ratio`` 0.75, a 2-block decoder of width 768 and 16 heads)."""

    mask_ratio: float = 0.75
    decoder_depth: int = 2
    decoder_width: int = 768
    decoder_heads: int = 16
    decoder_mlp_ratio: float = 4.0
    normalise_target: bool = True                 # MAE's norm_pix_loss
    cls_position: bool = False                    # ViCHA prepends the bare cls_token; true adds its position

    def __post_init__(self):
        require(0.0 < self.mask_ratio < 1.0, "mask_ratio", f"must lie in (0, 1), got {self.mask_ratio}")
        require_at_least(self.decoder_depth, "decoder_depth", 1)
        require_at_least(self.decoder_heads, "decoder_heads", 1)
        require(self.decoder_width % self.decoder_heads == 0 and self.decoder_width % 4 == 0, "decoder_width",
                f"must be divisible by decoder_heads ({self.decoder_heads}) and by 4, got {self.decoder_width}")
        require(self.decoder_mlp_ratio > 0, "decoder_mlp_ratio", f"must be positive, got {self.decoder_mlp_ratio}")


class MaskedImageModelling(Objective):
    """ViCHA's unimodal MAE on the online ViT; term ``mim`` (see the module docstring)."""

    Config = MaskedImageModellingConfig
    terms = ("mim",)

    def __init__(self, config: MaskedImageModellingConfig, build: BuildContext):
        super().__init__(config, build)
        encoder = build.model.visual_encoder
        rows, columns = encoder.grid_size
        patch_height, patch_width = encoder.patch_size
        if rows != columns or patch_height != patch_width:
            raise ConfigError(f"objectives.mim: needs square images and patches, the ViT has a {rows}x{columns} grid "
                              f"of {patch_height}x{patch_width} px patches")
        if int(rows * columns * (1 - config.mask_ratio)) < 1:
            raise ConfigError(f"objectives.mim.mask_ratio={config.mask_ratio} keeps no patch of {rows * columns}")
        self.patch_size = patch_height
        width = config.decoder_width
        self.decoder_embed = nn.Linear(encoder.width, width)
        # ViCHA's mask token starts at zero (it re-creates the parameter after MAE's normal init).
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.decoder_blocks = nn.ModuleList(
            Block(width, config.decoder_heads, config.decoder_mlp_ratio, qkv_bias=True,
                  norm_layer=partial(nn.LayerNorm, eps=1e-6)) for _ in range(config.decoder_depth))
        self.decoder_norm = nn.LayerNorm(width)
        self.mae_proj = nn.Linear(width, self.patch_size * self.patch_size * 3)
        # Fixed, so not a parameter nor saved: a function of the grid (checkpoints that hold it are checked).
        self.register_buffer("decoder_pos_embed", sincos_positions(width, rows).unsqueeze(0), persistent=False)

    def encode_visible(self, encoder, images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The ViT on the kept patches (CLS first): ``[B, 1 + K, D]`` after the final norm."""
        tokens = encoder.embed(images.to(encoder.cls_token.dtype), keep=keep)
        if not self.config.cls_position:
            tokens = torch.cat([encoder.cls_token.expand(tokens.shape[0], -1, -1), tokens[:, 1:]], dim=1)
        hidden, _ = encoder.run_blocks(tokens)
        return encoder.norm(hidden)

    def decode(self, latent: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        """Encoder states ``[B, 1 + K, D]`` -> pixel predictions ``[B, N, p * p * 3]`` for every patch in grid order."""
        tokens = self.decoder_embed(latent)
        batch, patches = restore.shape
        masked = self.mask_token.to(tokens.dtype).expand(batch, patches - (tokens.shape[1] - 1), -1)
        shuffled = torch.cat([tokens[:, 1:], masked], dim=1)
        unshuffled = torch.gather(shuffled, 1, restore.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        tokens = torch.cat([tokens[:, :1], unshuffled], dim=1) + self.decoder_pos_embed.to(tokens.dtype)
        for block in self.decoder_blocks:
            tokens = block(tokens)
        return self.mae_proj(self.decoder_norm(tokens))[:, 1:]

    def forward(self, encoded: Encoded, encoded_m: Encoded | None, batch: dict,
                step: StepContext) -> dict[str, torch.Tensor]:
        encoder = step.model.visual_encoder
        images = batch["image"]
        keep, mask, restore = random_masking(images.shape[0], encoder.num_patches, self.config.mask_ratio,
                                             images.device)
        prediction = self.decode(self.encode_visible(encoder, images, keep), restore)
        target = patchify(images.float(), self.patch_size)
        return {"mim": masked_patch_loss(prediction, target, mask, self.config.normalise_target)}
