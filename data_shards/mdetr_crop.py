"""MDETR's random resize and size crop (PEVL's grounding augmentation) as a crop window of the source image.

PEVL (``dataset/grounding_dataset.py``, ``Augfunc``) resizes the whole image to the training size with
probability 0.25; otherwise it resizes the shorter side to one of 400, 500, 600 pixels (the longer side kept
under 1333), cuts a random window of ``randint(384, min(side, 1333))`` pixels per side at a random place, and
then resizes that window to the training size. Only the window matters for the pixels the model sees, so
``mdetr_crop_window`` draws the same window in source pixels; the rest of the pipeline (resize, flip, boxes:
``data_shards.boxes``) is shared with every other crop rule::

    window = mdetr_crop_window(random.Random(0), width=640, height=480)   # (x0, y0, x1, y1) source pixels

Boxes follow the window as with any crop; a box the window cuts off is dropped with its phrase's markers
(PEVL clamps such a box to a zero-area one and still writes its tokens; its "respect boxes" retry never
runs, because its loop returns the first window).
"""

from __future__ import annotations

import random

RESIZE_SIDES = (400, 500, 600)
MIN_CROP = 384
MAX_SIZE = 1333
PLAIN_RESIZE_PROBABILITY = 0.25


def resized_shape(width: int, height: int, side: int, max_size: int = MAX_SIZE) -> tuple[int, int]:
    """``(width, height)`` after MDETR's resize of the shorter side to ``side`` (the longer kept <= max_size)."""
    short, long = min(width, height), max(width, height)
    if long / short * side > max_size:
        side = int(round(max_size * short / long))
    if (width <= height and width == side) or (height <= width and height == side):
        return width, height
    if width < height:
        return side, int(side * height / width)
    return int(side * width / height), side


def mdetr_crop_window(rng: random.Random, width: int, height: int) -> tuple[float, float, float, float]:
    """The source-pixel window PEVL's augmentation shows the model (see the module docstring)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if rng.random() < PLAIN_RESIZE_PROBABILITY:
        return (0.0, 0.0, float(width), float(height))
    resized_width, resized_height = resized_shape(width, height, rng.choice(RESIZE_SIDES))
    crop_width = rng.randint(min(MIN_CROP, resized_width), min(resized_width, MAX_SIZE))
    crop_height = rng.randint(min(MIN_CROP, resized_height), min(resized_height, MAX_SIZE))
    top = rng.randint(0, resized_height - crop_height)
    left = rng.randint(0, resized_width - crop_width)
    scale_x, scale_y = width / resized_width, height / resized_height
    return (left * scale_x, top * scale_y, (left + crop_width) * scale_x, (top + crop_height) * scale_y)
