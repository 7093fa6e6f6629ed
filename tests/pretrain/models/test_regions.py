"""Tests of pretrain/models/regions.py: boxes to grid cells against a cell-by-cell overlap check and X-VLM's rule,
the attention-mask layout, and a region's tokens against the encoder run on the in-box tokens alone.

CPU, tiny grids and a tiny ViT; run with ``pytest tests/pretrain/models/test_regions.py``.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from pretrain.models.regions import box_patch_mask, region_attention_mask
from pretrain.models.vision import build_vision_encoder


def cells_by_overlap(box, grid, patch):
    """Row-major list: does the box's interior overlap the cell's interior? Checked cell by cell."""
    (x0, y0, x1, y1), (rows, columns), (patch_height, patch_width) = box, grid, patch
    covered = []
    for row in range(rows):
        for column in range(columns):
            overlap_width = min(x1, (column + 1) * patch_width) - max(x0, column * patch_width)
            overlap_height = min(y1, (row + 1) * patch_height) - max(y0, row * patch_height)
            covered.append(overlap_width > 0 and overlap_height > 0)
    return covered


def x_vlm_image_atts(x, y, w, h, patch, cells):
    """X-VLM's published rule for a box (xywh) inside a square image: [CLS] + row-major cells, as 0/1."""
    x_first = min(math.floor(x / patch), cells - 1)
    x_stop = max(x_first + 1, min(math.ceil((x + w) / patch), cells))
    y_first = min(math.floor(y / patch), cells - 1)
    y_stop = max(y_first + 1, min(math.ceil((y + h) / patch), cells))
    atts = [1] + [0] * cells * cells
    for column in range(x_first, x_stop):
        for row in range(y_first, y_stop):
            atts[1 + cells * row + column] = 1
    return atts


def random_coordinate(rng, patch, cells):
    """Uniform over the image and beyond its sides, or exactly on a cell edge, or just beside one."""
    extent = patch * cells
    kind = rng.random()
    if kind < 0.4:
        return rng.uniform(-0.3 * extent, 1.3 * extent)
    edge = patch * rng.randint(-1, cells + 1)
    if kind < 0.7:
        return float(edge)
    return edge + rng.choice((-1, 1)) * rng.choice((1e-9, 1e-3, 0.5))


def random_boxes(rng, grid, patch, count):
    """Boxes with some area inside the image: wide, edge-aligned, tiny (1e-3 px) and partly outside."""
    (rows, columns), (patch_height, patch_width) = grid, patch
    boxes = []
    while len(boxes) < count:
        x0, x1 = sorted(random_coordinate(rng, patch_width, columns) for _ in range(2))
        y0, y1 = sorted(random_coordinate(rng, patch_height, rows) for _ in range(2))
        if rng.random() < 0.2:  # tiny box
            x1, y1 = x0 + 1e-3, y0 + 1e-3
        inside = min(x1, columns * patch_width) > max(x0, 0) and min(y1, rows * patch_height) > max(y0, 0)
        if inside:
            boxes.append((x0, y0, x1, y1))
    return boxes


@pytest.mark.parametrize(("grid", "patch"), [((4, 4), (16, 16)), ((3, 5), (16, 8)), ((1, 1), (32, 32))])
def test_cells_are_those_whose_interior_the_box_overlaps(grid, patch):
    boxes = random_boxes(random.Random(0), grid, patch, 3000)
    mask = box_patch_mask(torch.tensor(boxes, dtype=torch.float64), grid, patch)
    expected = torch.tensor([cells_by_overlap(box, grid, patch) for box in boxes])
    assert mask.dtype == torch.bool and mask.shape == (len(boxes), grid[0] * grid[1])
    mismatched = torch.nonzero((mask != expected).any(dim=1)).flatten().tolist()
    assert not mismatched, [boxes[index] for index in mismatched[:5]]


def test_attention_mask_is_x_vlm_image_atts_for_boxes_inside_the_image():
    rng, patch, cells = random.Random(1), 16, 4
    boxes_xywh = []
    for _ in range(2000):
        x = rng.choice((rng.uniform(0, 63), float(16 * rng.randint(0, 3))))
        y = rng.choice((rng.uniform(0, 63), float(16 * rng.randint(0, 3))))
        w = rng.choice((rng.uniform(1e-3, 64 - x), 16.0 * rng.randint(1, 4), 1e-3))
        h = rng.choice((rng.uniform(1e-3, 64 - y), 16.0 * rng.randint(1, 4), 1e-3))
        boxes_xywh.append((x, y, min(w, 64 - x), min(h, 64 - y)))
    boxes = torch.tensor([(x, y, x + w, y + h) for x, y, w, h in boxes_xywh], dtype=torch.float64)
    mask = region_attention_mask(box_patch_mask(boxes, (cells, cells), patch))
    expected = torch.tensor([x_vlm_image_atts(*box, patch, cells) for box in boxes_xywh], dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_float32_boxes_use_their_exact_values():
    boxes = torch.tensor([[15.999999, 0.0, 16.000002, 0.5], [0.1, 0.1, 47.99999, 16.0]], dtype=torch.float32)
    expected = torch.tensor([cells_by_overlap(box, (4, 4), (16, 16)) for box in boxes.tolist()])
    assert torch.equal(box_patch_mask(boxes, (4, 4), 16), expected)


def test_named_cases():
    grid, patch = (4, 4), 16
    boxes = torch.tensor(
        [
            [16.0, 16.0, 32.0, 32.0],  # exactly one cell: its edges do not take the neighbours
            [0.0, 0.0, 64.0, 64.0],  # the whole image
            [15.5, 40.0, 16.5, 40.001],  # tiny, across a column edge: two cells
            [-10.0, -10.0, 20.0, 8.0],  # partly outside: clipped to the image
            [60.0, 60.0, 100.0, 100.0],  # mostly outside: the corner cell
        ]
    )
    cells = box_patch_mask(boxes, grid, patch).reshape(5, 4, 4)
    expected = torch.zeros(5, 4, 4, dtype=torch.bool)
    expected[0, 1, 1] = True
    expected[1] = True
    expected[2, 2, 0:2] = True
    expected[3, 0, 0:2] = True
    expected[4, 3, 3] = True
    assert torch.equal(cells, expected)
    assert box_patch_mask(torch.zeros(0, 4), grid, patch).shape == (0, 16)


@pytest.mark.parametrize(
    "box",
    [
        [70.0, 0.0, 80.0, 10.0],  # right of the image
        [0.0, -20.0, 10.0, 0.0],  # above it, touching its top edge
        [10.0, 10.0, 10.0, 20.0],  # no width
        [20.0, 10.0, 10.0, 20.0],  # x1 < x0
        [float("nan"), 0.0, 10.0, 10.0],
    ],
)
def test_boxes_without_area_in_the_image_are_errors_naming_them(box):
    boxes = torch.tensor([[0.0, 0.0, 8.0, 8.0], box])
    with pytest.raises(ValueError, match=r"boxes \[1\] have no area inside the 64x64 px image"):
        box_patch_mask(boxes, (4, 4), 16)


def test_malformed_inputs_are_errors():
    with pytest.raises(ValueError, match=r"\[regions, 4\]"):
        box_patch_mask(torch.zeros(4), (4, 4), 16)
    with pytest.raises(ValueError, match="bool"):
        region_attention_mask(torch.ones(2, 16))


def test_attention_mask_layout_cls_patches_extra():
    patches = torch.tensor([[True, False, False, True], [False, False, True, False]])
    mask = region_attention_mask(patches)
    assert torch.equal(mask, torch.tensor([[1, 1, 0, 0, 1], [1, 0, 0, 1, 0]], dtype=torch.bool))
    with_extra = region_attention_mask(patches, extra_tokens=2)
    assert torch.equal(with_extra[:, :5], mask) and not with_extra[:, 5:].any()
    assert region_attention_mask(patches, extra_tokens=2, attend_extra=True)[:, 5:].all()
    assert region_attention_mask(patches, prefix_tokens=2)[:, :2].all()


def test_region_tokens_in_the_box_are_the_last_blocks_run_on_cls_and_box_tokens_alone():
    # Keys are restricted in every masked block, so CLS and in-box tokens never read anything else there:
    # the same blocks run unmasked on just those tokens must give the same states.
    torch.manual_seed(0)
    encoder = build_vision_encoder("vit_tiny_patch16_224", 64, embed_dim=64, depth=3, num_heads=2).eval()
    images = torch.randn(2, 3, 64, 64)
    boxes = torch.tensor([[16.0, 0.0, 40.0, 30.0], [0.0, 50.0, 10.0, 64.0], [3.0, 3.0, 64.0, 64.0]])
    image_index = torch.tensor([1, 0, 1])
    mask = region_attention_mask(box_patch_mask(boxes, encoder.grid_size, encoder.patch_size))
    with torch.no_grad():
        output = encoder.encode_regions(images, image_index, mask, masked_blocks=2)
        shared = encoder.blocks[0](encoder._pos_embed(encoder.patch_embed(images)))
        for region in range(3):
            positions = torch.nonzero(mask[region]).flatten()
            alone = shared[image_index[region], positions][None]
            for block in encoder.blocks[1:]:
                alone = block(alone)
            torch.testing.assert_close(output.region_tokens[region, positions], encoder.norm(alone)[0])
