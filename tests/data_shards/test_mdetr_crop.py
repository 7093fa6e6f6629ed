"""MDETR's random resize + size crop (PEVL's grounding augmentation) as a crop window, against its rule worked by
hand, and through the augmentation plan with boxes.

    .venv/bin/python -m pytest -q tests/data_shards/test_mdetr_crop.py
"""

from __future__ import annotations

import random

import pytest

from data_shards.boxes import TransformConfig, plan_augment, transform_boxes
from data_shards.mdetr_crop import mdetr_crop_window, resized_shape


def test_resize_keeps_the_aspect_and_the_longer_side_under_1333():
    assert resized_shape(640, 480, 400) == (533, 400)
    assert resized_shape(480, 640, 600) == (600, 800)
    assert resized_shape(400, 300, 300) == (400, 300)                  # already that size
    assert resized_shape(3000, 500, 600) == (1332, 222)                 # capped: side round(1333 / 6) = 222


def test_windows_follow_the_rule():
    rng = random.Random(0)
    whole, widths, heights = 0, [], []
    for _ in range(4000):
        x0, y0, x1, y1 = mdetr_crop_window(rng, 200, 160)
        assert 0 <= x0 < x1 <= 200 + 1e-9 and 0 <= y0 < y1 <= 160 + 1e-9
        if (x0, y0, x1, y1) == (0.0, 0.0, 200.0, 160.0):
            whole += 1
        else:
            widths.append((x1 - x0) / 200)
            heights.append((y1 - y0) / 160)
    assert abs(whole / 4000 - 0.25) < 0.03
    # A window is at least 384 px of the image resized to a short side of at most 600 px (750 x 600 here).
    assert min(heights) >= 384 / 600 - 1e-9 and min(widths) >= 384 / 750 - 1e-9
    assert min(widths) < 0.55 and max(widths) <= 1.0 and max(heights) <= 1.0


def test_the_plan_uses_the_window_and_boxes_follow_it():
    config = TransformConfig(image_size=64, crop_mode="mdetr", hflip_prob=0.0, randaugment_ops=0)
    rng = random.Random(3)
    for _ in range(50):
        plan = plan_augment(rng, 200, 160, config)
        x0, y0, x1, y1 = plan.crop
        boxes, keep = transform_boxes([[x0, y0, x1, y1]], plan)
        assert keep.all() and boxes[0].tolist() == pytest.approx([0, 0, 64, 64], abs=1e-3)
    with pytest.raises(ValueError, match="crop_mode"):
        TransformConfig(crop_mode="square")


def test_crop_mode_none_keeps_the_whole_image_and_every_box():
    config = TransformConfig(image_size=64, crop_mode="none", hflip_prob=0.0, randaugment_ops=0)
    for seed in range(5):
        plan = plan_augment(random.Random(seed), 300, 120, config)
        assert plan.crop == (0.0, 0.0, 300.0, 120.0)
