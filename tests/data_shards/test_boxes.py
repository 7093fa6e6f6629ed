"""Tests for data_shards/boxes.py: plans, box geometry, left/right text swaps, meta rewriting.

Run: ``.venv/bin/python -m pytest -q tests/data_shards/test_boxes.py`` (pure numpy, no images).
"""

import dataclasses
import math
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_shards.boxes import (
    AugmentPlan,
    TransformConfig,
    crop_window_for_box,
    draw_randaugment,
    geometric_op_matrix,
    invert_affine,
    plan_augment,
    randaugment_value,
    random_resized_crop,
    sample_random,
    swap_left_right,
    transform_boxes,
    transform_meta,
    transform_text,
)

NO_AUGMENT = TransformConfig(image_size=100, randaugment_ops=0, hflip_prob=0.0)


def plain_plan(crop, size, flip=False, affine=None):
    return AugmentPlan(crop=crop, flip=flip, size=size, affine=affine, photometric=())


def test_config_errors_name_every_bad_field():
    with pytest.raises(ValueError) as error:
        TransformConfig(image_size=0, flip_text="mirror", crop_scale=(0.5, 0.2))
    message = str(error.value)
    assert message.startswith("invalid TransformConfig: image_size must be positive, got 0")
    assert "crop_scale must satisfy 0 < low <= high <= 1, got (0.5, 0.2)" in message
    assert "flip_text must be one of swap, skip, none, got 'mirror'" in message


def test_eval_plan_is_a_pure_resize_and_boxes_scale():
    config = TransformConfig(image_size=128, train=False)
    plan = plan_augment(random.Random(3), 640, 480, config, text="left")
    assert plan == AugmentPlan((0.0, 0.0, 640.0, 480.0), False, (128, 128), None, ())
    boxes = np.array([[10.0, 20.0, 330.0, 470.0], [0.0, 0.0, 640.0, 480.0]])
    moved, keep = transform_boxes(boxes, plan)
    np.testing.assert_allclose(moved, boxes * [128 / 640, 128 / 480, 128 / 640, 128 / 480], rtol=1e-6)
    assert moved.dtype == np.float32 and keep.tolist() == [True, True]


def test_crop_resize_and_flip_by_hand():
    plan = plain_plan((10.0, 20.0, 110.0, 70.0), size=(100, 50), flip=True)  # x scale 0.5, y scale 2
    moved, keep = transform_boxes([[30.0, 30.0, 50.0, 40.0]], plan)
    # crop: (20, 10, 40, 20); resize: (10, 20, 20, 40); flip in width 50: (30, 20, 40, 40)
    np.testing.assert_allclose(moved, [[30.0, 20.0, 40.0, 40.0]])
    assert keep.tolist() == [True]


def test_flip_twice_is_identity():
    plan = plain_plan((0.0, 0.0, 200.0, 100.0), size=(100, 200), flip=True)
    boxes = np.array([[5.0, 6.0, 70.0, 90.0], [150.0, 0.0, 200.0, 100.0]])
    once, _ = transform_boxes(boxes, plan)
    assert not np.allclose(once, boxes)
    twice, keep = transform_boxes(once, plan)
    np.testing.assert_allclose(twice, boxes, atol=1e-5)
    assert keep.all()


def test_boxes_outside_the_crop_are_dropped_and_straddling_ones_clipped():
    plan = plain_plan((50.0, 50.0, 150.0, 150.0), size=(100, 100))
    boxes = [[0, 0, 40, 40], [60, 60, 80, 80], [140, 140, 300, 300], [150, 60, 170, 90], [100, 0, 120, 50.5]]
    moved, keep = transform_boxes(boxes, plan)
    assert keep.tolist() == [False, True, True, False, False]
    assert int((~keep).sum()) == 3
    np.testing.assert_allclose(moved[1], [10, 10, 30, 30])
    np.testing.assert_allclose(moved[2], [90, 90, 100, 100])


def test_a_dropped_box_stays_dropped_when_the_affine_would_give_its_line_an_area():
    rotate = geometric_op_matrix("rotate", 30.0, (100, 100))
    plan = plain_plan((50.0, 50.0, 150.0, 150.0), size=(100, 100), affine=tuple(rotate[:2].ravel()))
    moved, keep = transform_boxes([[0, 60, 40, 90]], plan)  # clipped to the line x = 0 before rotating
    assert keep.tolist() == [False]
    assert moved[0, 2] - moved[0, 0] > 1  # the rotated line has a width, yet the box is not kept


def test_empty_and_malformed_boxes():
    moved, keep = transform_boxes(np.zeros((0, 4)), plain_plan((0.0, 0.0, 10.0, 10.0), (5, 5)))
    assert moved.shape == (0, 4) and keep.shape == (0,)
    with pytest.raises(ValueError, match=r"boxes must have shape \(N, 4\) as xyxy, got \(2, 3\)"):
        transform_boxes([[1, 2, 3], [4, 5, 6]], plain_plan((0.0, 0.0, 10.0, 10.0), (5, 5)))


def test_geometric_ops_move_corners_as_albef_defines_them():
    size = (100, 200)  # height, width
    quarter_turn = geometric_op_matrix("rotate", 90.0, size)
    # counter-clockwise on screen about (100, 50): the point right of the centre goes above it
    np.testing.assert_allclose(quarter_turn @ [150.0, 50.0, 1.0], [100.0, 0.0, 1.0], atol=1e-9)
    np.testing.assert_allclose(geometric_op_matrix("translate_x", 7.0, size) @ [10, 10, 1], [3, 10, 1])
    np.testing.assert_allclose(geometric_op_matrix("translate_y", -7.0, size) @ [10, 10, 1], [10, 17, 1])
    np.testing.assert_allclose(geometric_op_matrix("shear_x", 0.5, size) @ [10, 20, 1], [20, 20, 1])
    np.testing.assert_allclose(geometric_op_matrix("shear_y", 0.5, size) @ [10, 20, 1], [10, 25, 1])
    inverse = np.vstack([np.reshape(invert_affine(tuple(quarter_turn[:2].ravel())), (2, 3)), [0, 0, 1]])
    np.testing.assert_allclose(inverse @ quarter_turn, np.eye(3), atol=1e-12)


def test_affine_takes_the_enclosing_box_of_the_moved_corners():
    rotate = geometric_op_matrix("rotate", 45.0, (100, 100))
    plan = plain_plan((0.0, 0.0, 100.0, 100.0), size=(100, 100), affine=tuple(rotate[:2].ravel()))
    moved, keep = transform_boxes([[40, 40, 60, 60]], plan)
    half_diagonal = 10 * math.sqrt(2)
    np.testing.assert_allclose(moved[0], [50 - half_diagonal, 50 - half_diagonal] * 2 + np.array(
        [0, 0, 2 * half_diagonal, 2 * half_diagonal]), atol=1e-4)
    assert keep.tolist() == [True]


def test_albef_randaugment_values_at_magnitude_seven():
    values = {name: randaugment_value(name, 7) for name in ("brightness", "sharpness", "shear_x",
                                                             "translate_y", "rotate", "equalize")}
    assert values == {"brightness": 1.36, "sharpness": 1.36, "shear_x": 0.21, "translate_y": 7.0,
                      "rotate": 21.0, "equalize": 1.0}
    with pytest.raises(ValueError, match="unknown RandAugment op 'solarize'"):
        randaugment_value("solarize", 7)


def test_randaugment_draws_follow_albef_probabilities():
    rng = random.Random(0)
    applied_photometric = 0
    geometric = 0
    rotation_entries = set()
    for _ in range(4000):
        affine, photometric = draw_randaugment(rng, 2, 7, (256, 256))
        applied_photometric += len(photometric)
        for name, value in photometric:
            assert (name, value) in {("brightness", 1.36), ("sharpness", 1.36), ("autocontrast", 1.0),
                                     ("equalize", 1.0)}
        if affine is not None:
            geometric += 1
            rotation_entries.add(round(affine[1], 4))
    # per slot: an op is applied with p 0.5, 4 of 10 ops are photometric, 5 geometric
    assert applied_photometric / 8000 == pytest.approx(0.5 * 0.4, abs=0.02)
    assert geometric / 4000 == pytest.approx(1 - (1 - 0.25) ** 2, abs=0.03)
    assert {0.0, 0.21, -0.21, round(math.sin(math.radians(21)), 4)} <= rotation_entries


@given(st.integers(1, 400), st.integers(1, 400), st.integers(0, 10**6))
def test_random_resized_crop_stays_inside_with_whole_pixels(width, height, seed):
    x0, y0, x1, y1 = random_resized_crop(random.Random(seed), width, height, (0.2, 1.0), (3 / 4, 4 / 3))
    assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
    assert all(value == int(value) for value in (x0, y0, x1, y1))


def test_random_resized_crop_falls_back_to_a_centre_crop_of_the_widest_ratio():
    crop = random_resized_crop(random.Random(0), 1000, 10, (0.9, 1.0), (3 / 4, 4 / 3))
    assert crop == (493.0, 0.0, 506.0, 10.0)  # width round(10 * 4/3) = 13, left edge (1000 - 13) // 2


@settings(max_examples=200)
@given(st.integers(20, 300), st.integers(20, 300), st.data())
def test_region_crop_keeps_the_chosen_box_inside(width, height, data):
    x0 = data.draw(st.floats(0, width - 2))
    y0 = data.draw(st.floats(0, height - 2))
    x1 = data.draw(st.floats(x0 + 1, width))
    y1 = data.draw(st.floats(y0 + 1, height))
    config = TransformConfig(image_size=64, region_crop=True, randaugment_ops=0)
    plan = plan_augment(random.Random(data.draw(st.integers(0, 10**6))), width, height, config,
                        keep_box=(x0, y0, x1, y1))
    crop_x0, crop_y0, crop_x1, crop_y1 = plan.crop
    assert crop_x0 <= x0 and crop_y0 <= y0 and x1 <= crop_x1 and y1 <= crop_y1
    assert crop_x0 >= 0 and crop_y0 >= 0 and crop_x1 <= width and crop_y1 <= height
    moved, keep = transform_boxes([[x0, y0, x1, y1]], plan, min_side=0.0)
    assert keep.all() and (moved >= 0).all() and (moved <= 64).all()


def test_region_crop_varies_and_rejects_a_box_outside_the_image():
    crops = {crop_window_for_box(random.Random(seed), (40, 40, 60, 60), 100, 100) for seed in range(50)}
    assert len(crops) > 40
    with pytest.raises(ValueError, match=r"region box \[120, 0, 130, 10\] has no area inside the 100x100"):
        crop_window_for_box(random.Random(0), [120, 0, 130, 10], 100, 100)


def test_region_crop_without_a_box_draws_the_random_resized_crop():
    with_region = plan_augment(random.Random(5), 300, 200, dataclasses.replace(NO_AUGMENT, region_crop=True))
    assert with_region == plan_augment(random.Random(5), 300, 200, NO_AUGMENT)


def test_same_seed_same_plan_and_sample_random_is_stable():
    config = TransformConfig()
    plans = [plan_augment(sample_random(7, 0, 3, "key-1"), 500, 400, config) for _ in range(2)]
    assert plans[0] == plans[1]
    draws = {sample_random(7, epoch, 3, "key-1").random() for epoch in range(20)}
    assert len(draws) == 20
    # a fixed value pins the hash, so runs on other machines and Pythons draw the same plans
    assert sample_random(0, 0, 0, "a").random() == sample_random(0, 0, 0, "a").random()
    assert sample_random(0, 0, 0, "a").random() != sample_random(0, 0, 0, "b").random()


def test_transform_text_swaps_whole_words_and_keeps_case():
    flipped = plain_plan((0.0, 0.0, 1.0, 1.0), (1, 1), flip=True)
    text = "Left of the leftover RIGHT box, the leftmost dog; right-hand side. Bright."
    swapped = "Right of the leftover LEFT box, the rightmost dog; left-hand side. Bright."
    assert transform_text(text, flipped, TransformConfig()) == swapped
    assert transform_text(text, flipped, TransformConfig(flip_text="none")) == text
    assert transform_text(text, dataclasses.replace(flipped, flip=False), TransformConfig()) == text


def test_skip_mode_never_flips_when_the_text_says_left_or_right():
    config = TransformConfig(hflip_prob=1.0, flip_text="skip", randaugment_ops=0)
    assert not any(plan_augment(random.Random(seed), 50, 50, config, text="dog on the Left").flip
                   for seed in range(30))
    assert all(plan_augment(random.Random(seed), 50, 50, config, text="leftover dog").flip
               for seed in range(30))


def test_swap_offsets_let_spans_follow():
    caption = "a dog left of a cat, right of a rightmost hat"
    swapped, new_offset = swap_left_right(caption)
    assert swapped == "a dog right of a cat, left of a leftmost hat"
    for phrase in ("dog", "cat", "hat", "a dog right"):
        start = caption.index(phrase.replace("right", "left"))
        end = start + len(phrase.replace("right", "left"))
        assert swapped[new_offset(start):new_offset(end)] == phrase


def meta_example():
    return {
        "width": 200, "height": 100, "sentence": "the left one", "answers": [{"answer": "right", "count": 3}],
        "text": "the Left dog",
        "regions": [
            {"box": [10, 10, 50, 50], "text": "dog", "span": [2, 5]},
            {"box": [190, 0, 200, 5], "text": "speck", "span": [0, 1]},
            {"box": [150, 50, 190, 90], "text": "left cat", "span": [13, 21]},
        ],
        "box": [0, 0, 400, 50], "proposals": [[10, 10, 50, 50], {"box": [0, 0, 20, 20], "score": 0.5}],
    }


def test_transform_meta_moves_boxes_drops_vanished_regions_and_swaps_texts():
    caption = "a dog on the left cat"
    meta = meta_example()
    original = meta_example()
    plan = plain_plan((0.0, 0.0, 190.0, 100.0), size=(100, 190), flip=True)
    result = transform_meta(meta, plan, TransformConfig(), caption=caption)
    assert meta == original  # not modified
    assert [region["text"] for region in result["regions"]] == ["dog", "right cat"]
    assert result["regions"][0]["box"] == [140.0, 10.0, 180.0, 50.0]
    assert result["regions"][1]["box"] == [0.0, 50.0, 40.0, 90.0]
    swapped_caption = transform_text(caption, plan, TransformConfig())
    for region in result["regions"]:
        start, end = region["span"]
        assert swapped_caption[start:end] == region["text"]
    assert result["box"] == [0.0, 0.0, 190.0, 50.0]  # clipped, kept
    assert result["proposals"] == [
        [140.0, 10.0, 180.0, 50.0], {"box": [170.0, 0.0, 190.0, 20.0], "score": 0.5}]
    assert (result["width"], result["height"]) == (190, 100)
    assert result["sentence"] == "the right one" and result["answers"] == [{"answer": "left", "count": 3}]
    assert result["text"] == "the Right dog"


def test_transform_meta_without_flip_keeps_texts_and_asks_for_the_caption_when_spans_must_move():
    plan = plain_plan((0.0, 0.0, 200.0, 100.0), size=(50, 100))
    result = transform_meta(meta_example(), plan, TransformConfig())
    assert result["sentence"] == "the left one" and result["regions"][2]["text"] == "left cat"
    assert result["regions"][2]["box"] == [75.0, 25.0, 95.0, 45.0]
    with pytest.raises(ValueError, match=r"pass caption=<the sample's txt> so the spans can follow"):
        transform_meta(meta_example(), dataclasses.replace(plan, flip=True), TransformConfig())
    with pytest.raises(ValueError, match=r"meta region 0 has no 'box' \(keys: \['text'\]\)"):
        transform_meta({"regions": [{"text": "x"}]}, plan, TransformConfig())
