"""X-VLM's Swin image tower: timm's Swin Transformer returning [CLS] + grid tokens, region features by pooling.

X-VLM's default backbone (reference/methods.md section 1) is Swin-B at 224 px: its last stage is a 7 x 7 grid
(one token per 32 x 32 pixels), and a [CLS] is made by average pooling the grid. ``SwinEncoder`` IS timm's
``SwinTransformer`` (names and weights as timm makes them) and returns what the ALBEF backbone expects of an
image tower, ``[B, 1 + N, D]`` tokens after the final norm, [CLS] first::

    encoder = build_swin_encoder("swin_base_patch4_window7_224", 224)        # random init, never downloads
    report = load_swin_weights(encoder, "swin_base_patch4_window7_224_22k.pth")  # Microsoft's or timm's file
    tokens = encoder(images)                                                  # [B, 1 + 49, 1024]
    out = encoder.encode_regions(images, image_index, masks, masked_blocks=4)  # out.region_tokens [R, 1 + 49, D]

Regions (X-VLM's Swin way): each image is encoded once; a region's sequence is its image's grid tokens with,
as [CLS], the mean of the grid tokens its mask allows (``pretrain.models.regions`` builds the masks from boxes
with ``grid_size`` and ``patch_size`` = 32 here); the same mask then restricts the text's cross-attention.
``masked_blocks`` (the ViT way's ``local_attn_depth``) does not apply to Swin and is ignored.

Weights: ``load_swin_weights`` reads Microsoft's Swin checkpoints (``{"model": ...}``, patch merging at the end
of each stage) or timm's, drops the buffers it recomputes (``relative_position_index``, ``attn_mask``) and the
classifier, and resizes each ``relative_position_bias_table`` to this encoder's window by X-VLM's rule
(``resize_relative_position_table``), so a 224 px / window 7 checkpoint loads at 384 px / window 12 (X-VLM issue
#35 is the failure when this is skipped).
"""

from __future__ import annotations

import re

import numpy as np
import timm
import torch
from timm.models.swin_transformer import SwinTransformer

from pretrain.models import LoadReport, read_state_dict
from pretrain.models.vision import VisionOutput

SWIN_BUFFERS = ("relative_position_index", "attn_mask")


def is_swin(name: str) -> bool:
    """Whether a timm model name is a (v1) Swin Transformer, which ``build_swin_encoder`` builds."""
    return name.startswith("swin_") and not name.startswith(("swinv2", "swin_s3"))


class SwinEncoder(SwinTransformer):
    """timm's ``SwinTransformer`` whose forward returns ``[B, 1 + N, D]``: the mean of the final grid, then the grid.

    Made by ``build_swin_encoder``, which gives the built timm model this class (no state added).
    """

    @property
    def width(self) -> int:
        return self.num_features

    @property
    def grid_size(self) -> tuple[int, int]:
        """(rows, columns) of the last stage's grid at the built image size ((7, 7) at 224 px)."""
        rows, columns = self.layers[-1].blocks[0].input_resolution
        return int(rows), int(columns)

    @property
    def patch_size(self) -> tuple[int, int]:
        """Pixels per last-stage grid cell (32 x 32 for the 4-stage Swins: patch 4, three 2x merges)."""
        height, width = self.patch_embed.patch_size
        scale = 2 ** (len(self.layers) - 1)
        return height * scale, width * scale

    @property
    def num_patches(self) -> int:
        rows, columns = self.grid_size
        return rows * columns

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        super().set_grad_checkpointing(enabled)

    def grid_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """[B, N, D] last-stage tokens after the final norm, row-major."""
        return self.forward_features(images).flatten(1, 2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        grid = self.grid_tokens(images)
        return torch.cat([grid.mean(dim=1, keepdim=True), grid], dim=1)

    def encode(self, images: torch.Tensor, *, layers=(), norm_layers: bool = False, extra_tokens=None,
               keep=None) -> VisionOutput:
        """The ViT encoder's ``encode`` for the options a Swin has: the final tokens only."""
        if tuple(layers) or extra_tokens is not None or keep is not None:
            raise ValueError("the Swin image tower gives final tokens only: intermediate layers, extra tokens and "
                             "kept-patch subsets are ViT options (use a vit_* model.vision)")
        return VisionOutput(tokens=self(images), layers={}, grid=self.grid_size)

    def encode_regions(self, images: torch.Tensor, image_index: torch.Tensor, attention_mask: torch.Tensor, *,
                       masked_blocks: int = 0, extra_tokens=None) -> VisionOutput:
        """Whole images once, and per region its image's grid with the masked mean as [CLS] (module docstring)."""
        if extra_tokens is not None:
            raise ValueError("the Swin image tower takes no extra tokens")
        if image_index.ndim != 1 or image_index.dtype != torch.long:
            raise ValueError(f"image_index must be a 1-D int64 tensor, one image number per region; "
                             f"got {image_index.dtype} of shape {tuple(image_index.shape)}")
        grid = self.grid_tokens(images)
        if attention_mask.dtype != torch.bool or attention_mask.shape != (image_index.shape[0], 1 + grid.shape[1]):
            raise ValueError(f"attention_mask must be bool [regions, 1 + grid cells] = [{image_index.shape[0]}, "
                             f"{1 + grid.shape[1]}]; got {attention_mask.dtype} {tuple(attention_mask.shape)}")
        inside = attention_mask[:, 1:]
        if not inside.any(dim=1).all():
            raise ValueError("a region's mask covers no grid cell; build it with pretrain.models.regions")
        region_grid = grid[image_index]
        weights = inside.to(region_grid.dtype).unsqueeze(-1)
        region_cls = (weights * region_grid).sum(dim=1, keepdim=True) / weights.sum(dim=1, keepdim=True)
        whole = torch.cat([grid.mean(dim=1, keepdim=True), grid], dim=1)
        return VisionOutput(tokens=whole, layers={}, grid=self.grid_size,
                            region_tokens=torch.cat([region_cls, region_grid], dim=1))


def build_swin_encoder(name: str, image_size: int, **overrides) -> SwinEncoder:
    """A randomly initialised timm Swin by name at ``image_size``; never downloads. ``overrides`` go to
    ``timm.create_model`` (``embed_dim``, ``depths``, ``num_heads``, ``window_size``, ``drop_path_rate``...)."""
    if not is_swin(name):
        raise ValueError(f"{name!r} is not a Swin Transformer name (swin_*_patch4_window*_*)")
    try:
        model = timm.create_model(name, pretrained=False, img_size=image_size, num_classes=0, global_pool="",
                                  **overrides)
    except (RuntimeError, AssertionError, TypeError, ValueError) as error:
        raise ValueError(f"cannot build timm model {name!r} at {image_size} px: {error}") from None
    if type(model) is not SwinTransformer:
        raise ValueError(f"timm model {name!r} is a {type(model).__name__}, not a SwinTransformer")
    model.__class__ = SwinEncoder
    return model


def _not_a_knot_spline(x: np.ndarray, y: np.ndarray, new_x: np.ndarray) -> np.ndarray:
    """Cubic interpolating spline with not-a-knot ends through (x, y[..., i]) along the last axis, at ``new_x``
    (what FITPACK's interpolating cubic spline, behind X-VLM's ``interp2d(kind='cubic')``, gives on a grid)."""
    count = len(x)
    new_x = np.clip(new_x, x[0], x[-1])  # FITPACK evaluates outside the data at the nearest end
    if count < 4:
        return np.stack([np.interp(new_x, x, row) for row in y.reshape(-1, count)]).reshape(*y.shape[:-1], -1)
    step = np.diff(x)
    # Second derivatives M: continuity of the first derivative inside, not-a-knot at both ends.
    system = np.zeros((count, count))
    values = np.zeros((count,) + y.shape[:-1])
    slopes = np.diff(y, axis=-1) / step
    for row in range(1, count - 1):
        system[row, row - 1: row + 2] = (step[row - 1], 2 * (step[row - 1] + step[row]), step[row])
        values[row] = 6 * (slopes[..., row] - slopes[..., row - 1])
    system[0, :3] = (step[1], -(step[0] + step[1]), step[0])
    system[-1, -3:] = (step[-1], -(step[-2] + step[-1]), step[-2])
    second = np.linalg.solve(system, values.reshape(count, -1)).reshape(values.shape)
    second = np.moveaxis(second, 0, -1)
    segment = np.clip(np.searchsorted(x, new_x) - 1, 0, count - 2)
    left, width = x[segment], step[segment]
    t = new_x - left
    y0, y1 = y[..., segment], y[..., segment + 1]
    m0, m1 = second[..., segment], second[..., segment + 1]
    return (y0 + (y1 - y0) / width * t - width * t * (2 * m0 + m1) / 6
            + m0 / 2 * t ** 2 + (m1 - m0) / (6 * width) * t ** 3)


def resize_relative_position_table(table: torch.Tensor, window: int) -> torch.Tensor:
    """A Swin ``relative_position_bias_table`` [(2w - 1)^2, heads] resized to ``window``, by X-VLM's rule.

    X-VLM (after BEiT) places the source table's offsets on a geometric progression whose half-span equals the
    target's, and evaluates a bicubic interpolating spline of each head's table at the target's integer offsets.
    Unchanged when the sizes already agree.
    """
    source_count, heads = table.shape
    source_size, target_size = int(round(source_count ** 0.5)), 2 * window - 1
    if source_size * source_size != source_count:
        raise ValueError(f"a relative position table has a square number of rows, got {source_count}")
    if source_size == target_size:
        return table
    low, high = 1.01, 1.5
    while high - low > 1e-6:
        ratio = (low + high) / 2
        if (1 - ratio ** (source_size // 2)) / (1 - ratio) > target_size // 2:
            high = ratio
        else:
            low = ratio
    distances, current = [], 1.0
    for index in range(source_size // 2):
        distances.append(current)
        current += ratio ** (index + 1)
    source = np.array([-d for d in reversed(distances)] + [0.0] + distances)
    half = target_size // 2
    target = np.arange(-half, half + 0.1, 1.0)
    grid = table.detach().float().cpu().numpy().T.reshape(heads, source_size, source_size)
    along_columns = _not_a_knot_spline(source, grid, target)                                  # heads, rows, new
    resized = _not_a_knot_spline(source, along_columns.swapaxes(1, 2), target).swapaxes(1, 2)  # heads, new, new
    return torch.from_numpy(np.ascontiguousarray(resized.reshape(heads, -1).T)).to(table.dtype)


def microsoft_to_timm(state_dict: dict) -> dict:
    """Microsoft's Swin names (patch merging at the END of stage i) as timm's (at the START of stage i + 1)."""
    if not any(re.match(r"layers\.0\.downsample\.", key) for key in state_dict):
        return dict(state_dict)
    return {re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", key): value
            for key, value in state_dict.items()}


def fit_swin_state(encoder: SwinEncoder, state_dict: dict) -> tuple[dict, tuple[str, ...], tuple[str, ...]]:
    """``state_dict`` (either naming) ready for ``encoder``: timm names, recomputed buffers dropped, tables
    resized to the encoder's windows. Returns (state, dropped keys, resized keys)."""
    state = microsoft_to_timm(state_dict)
    dropped = tuple(sorted(key for key in state if key.split(".")[-1] in SWIN_BUFFERS or key.startswith("head.")))
    state = {key: value for key, value in state.items() if key not in dropped}
    own = encoder.state_dict()
    resized = []
    for key, value in list(state.items()):
        if key.endswith("relative_position_bias_table") and key in own and value.shape != own[key].shape:
            window = int(round((own[key].shape[0] ** 0.5 + 1) / 2))
            state[key] = resize_relative_position_table(value, window)
            resized.append(key)
    return state, dropped, tuple(resized)


def fit_vision_state(visual_encoder, state: dict, prefix: str = "visual_encoder.") -> dict:
    """A backbone ``state`` whose image-tower keys (under ``prefix``) fit ``visual_encoder``: for a Swin, Microsoft
    names mapped, recomputed buffers dropped and relative position tables resized to its windows (a ViT's
    ``pos_embed`` is interpolated where checkpoints are read); other keys and other towers pass unchanged."""
    if not isinstance(visual_encoder, SwinEncoder):
        return state
    tower = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    fitted, _, _ = fit_swin_state(visual_encoder, tower)
    return {**{key: value for key, value in state.items() if not key.startswith(prefix)},
            **{prefix + key: value for key, value in fitted.items()}}


def load_swin_weights(encoder: SwinEncoder, path: str, *, strict: bool = True) -> LoadReport:
    """Load a local Swin checkpoint into ``encoder`` (see the module docstring); a key that still does not fit
    is an error listing them all (or, without ``strict``, only reported)."""
    state, dropped, resized = fit_swin_state(encoder, read_state_dict(path))
    own = encoder.state_dict()
    mismatched = [f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}"
                  for key, value in state.items() if key in own and value.shape != own[key].shape]
    if mismatched:
        raise ValueError(f"{path!r} does not fit the Swin encoder; shape mismatches:\n  " + "\n  ".join(mismatched))
    missing = tuple(sorted(set(own) - set(state)))
    unexpected = tuple(sorted(set(state) - set(own)))
    if strict and (missing or unexpected):
        raise ValueError(f"{path!r} does not match the Swin encoder (pass strict=False to load what fits):\n"
                         f"  missing: {list(missing)}\n  unexpected: {list(unexpected)}")
    encoder.load_state_dict(state, strict=False)
    return LoadReport(missing=missing, unexpected=unexpected, dropped=dropped, resized=resized)
