"""Boxes to patch masks on the ViT grid, and the region attention masks ``VisionEncoder`` takes (X-VLM).

X-VLM encodes an image region with the image's own ViT: a copy of the token sequence runs the last
blocks with attention restricted to the patches the box covers plus CLS, and the text encoder's
cross-attention is restricted the same way. This file turns boxes into those masks::

    patches = box_patch_mask(boxes_xyxy, encoder.grid_size, encoder.patch_size)  # [R, rows*cols] bool
    mask = region_attention_mask(patches)                                          # [R, 1 + rows*cols] bool
    out = encoder.encode_regions(images, image_index, mask, masked_blocks=4)

Boxes are (x0, y0, x1, y1) in pixels of the image the model sees (after crop, flip and resize). The
cells a box covers follow X-VLM's ``RegionTextJsonDataset.get_image_attns``: columns
``floor(x0 / patch)`` up to ``ceil(x1 / patch)`` (exclusive), clamped to the grid and at least one
cell wide; rows alike. For a box inside the image that is exactly the cells whose interior overlaps
the box's interior, so a box edge on a cell edge does not take the neighbouring cell. X-VLM's data
only ever holds boxes clipped to the crop with positive area; here a box is clipped to the image, and
a box with no area inside it is an error.
"""

from __future__ import annotations

import torch


def box_patch_mask(boxes: torch.Tensor, grid: tuple[int, int], patch_size: int | tuple[int, int]) -> torch.Tensor:
    """``boxes`` [R, 4] xyxy pixels -> bool [R, rows*cols], True on the grid cells each box covers.

    ``grid`` is (rows, columns) and ``patch_size`` the patch (height, width) or one side, as
    ``VisionEncoder.grid_size`` / ``patch_size`` give them; the image spans rows*height by
    columns*width pixels. Cells are numbered row-major, as the ViT orders its patch tokens.
    """
    rows, columns = grid
    patch_height, patch_width = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be [regions, 4] as (x0, y0, x1, y1) pixels; got shape {tuple(boxes.shape)}")
    # X-VLM computes the cells in Python float64; float32 could move a coordinate across a cell edge.
    boxes = boxes.to(torch.float64)
    x0, x1 = boxes[:, 0].clamp(min=0), boxes[:, 2].clamp(max=columns * patch_width)
    y0, y1 = boxes[:, 1].clamp(min=0), boxes[:, 3].clamp(max=rows * patch_height)
    # Written as "not (x1 > x0)" so that NaN coordinates count as empty too.
    empty = ~((x1 > x0) & (y1 > y0))
    if empty.any():
        index = torch.nonzero(empty).flatten().tolist()
        shown = [boxes[i].tolist() for i in index[:4]]
        raise ValueError(
            f"boxes {index[:8]} have no area inside the {columns * patch_width}x{rows * patch_height} px image "
            f"(first: {shown}); give (x0, y0, x1, y1) with x0 < x1, y0 < y1 in the pixels the model sees, "
            "and drop regions cropped out of the image"
        )
    in_columns = _covered(x0, x1, patch_width, columns)
    in_rows = _covered(y0, y1, patch_height, rows)
    return (in_rows[:, :, None] & in_columns[:, None, :]).reshape(boxes.shape[0], rows * columns)


def region_attention_mask(
    patch_mask: torch.Tensor, *, prefix_tokens: int = 1, extra_tokens: int = 0, attend_extra: bool = False
) -> torch.Tensor:
    """``patch_mask`` [R, N] -> bool [R, prefix + N + extra] in the token layout of ``VisionEncoder``.

    The prefix (CLS) is always attendable, as X-VLM sets it: the region feature is that CLS. Extra
    tokens (ViCHA's visual concepts, appended after the patches) describe the whole image; X-VLM has
    none, and ``attend_extra`` chooses whether a region may read them (off keeps it to its box).
    """
    if patch_mask.ndim != 2 or patch_mask.dtype != torch.bool:
        raise ValueError(
            f"patch_mask must be bool [regions, patches] (box_patch_mask gives it); "
            f"got {patch_mask.dtype} of shape {tuple(patch_mask.shape)}"
        )
    regions = patch_mask.shape[0]
    prefix = patch_mask.new_ones(regions, prefix_tokens)
    extra = patch_mask.new_full((regions, extra_tokens), attend_extra)
    return torch.cat([prefix, patch_mask, extra], dim=1)


def _covered(low: torch.Tensor, high: torch.Tensor, patch: int, cells: int) -> torch.Tensor:
    """Bool [R, cells]: X-VLM's cell range along one axis, first = floor(low/patch), stop = ceil(high/patch)."""
    first = torch.floor(low / patch).clamp(max=cells - 1)
    stop = torch.maximum(first + 1, torch.ceil(high / patch).clamp(max=cells))
    index = torch.arange(cells, device=low.device, dtype=low.dtype)
    return (index >= first[:, None]) & (index < stop[:, None])
