"""Tests for data_shards/transforms.py: rendered pixels agree with the box geometry, decoding, the
per-sample transform and the batch contract.

Run: ``.venv/bin/python -m pytest -q tests/data_shards/test_transforms.py``.
"""

import dataclasses
import io
import pickle
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from data_shards.boxes import (
    CLIP_MEAN,
    CLIP_STD,
    AugmentPlan,
    TransformConfig,
    geometric_op_matrix,
    random_resized_crop,
    transform_boxes,
)
from data_shards.transforms import PilTransform, collate, decode_image, render_plan

RAW_PIXELS = TransformConfig(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def encode(array: np.ndarray, image_format: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=image_format)
    return buffer.getvalue()


def clip_polygon(points: list[tuple[float, float]], width: float, height: float) -> list[tuple[float, float]]:
    """Sutherland-Hodgman: the part of a convex polygon inside [0, width] x [0, height]."""
    edges = [(0, 0.0, 1), (0, width, -1), (1, 0.0, 1), (1, height, -1)]  # (axis, limit, inside sign)
    for axis, limit, sign in edges:
        clipped = []
        for index, current in enumerate(points):
            previous = points[index - 1]
            current_in = sign * (current[axis] - limit) >= 0
            previous_in = sign * (previous[axis] - limit) >= 0
            if current_in != previous_in:
                t = (limit - previous[axis]) / (current[axis] - previous[axis])
                clipped.append(tuple(p + t * (c - p) for p, c in zip(previous, current, strict=True)))
            if current_in:
                clipped.append(current)
        points = clipped
        if not points:
            break
    return points


@st.composite
def plans_and_boxes(draw):
    width, height = draw(st.integers(40, 120)), draw(st.integers(40, 120))
    x0, y0 = draw(st.integers(0, width - 8)), draw(st.integers(0, height - 8))
    box = (x0, y0, draw(st.integers(x0 + 8, width)), draw(st.integers(y0 + 8, height)))
    crop = random_resized_crop(random.Random(draw(st.integers(0, 10**6))), width, height, (0.3, 1.0),
                               (3 / 4, 4 / 3))
    size = (draw(st.integers(40, 72)), draw(st.integers(40, 72)))
    ops = draw(st.lists(st.sampled_from(["shear_x", "shear_y", "translate_x", "translate_y", "rotate"]),
                        max_size=2))
    ranges = {"shear_x": 0.3, "shear_y": 0.3, "translate_x": 10.0, "translate_y": 10.0, "rotate": 30.0}
    matrix = np.eye(3)
    for name in ops:
        value = draw(st.floats(-ranges[name], ranges[name]))
        matrix = geometric_op_matrix(name, value, size) @ matrix
    affine = tuple(matrix[:2].ravel()) if ops else None
    plan = AugmentPlan(crop, draw(st.booleans()), size, affine, (), fill=(0, 0, 0))
    return (width, height), box, plan


@settings(max_examples=120, deadline=None)
@given(plans_and_boxes())
def test_rendered_white_rectangle_matches_transform_boxes(case):
    (width, height), box, plan = case
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[box[1]:box[3], box[0]:box[2]] = 255
    rendered = render_plan(Image.fromarray(pixels), plan, RAW_PIXELS)
    white = (rendered[0] > 0.5).numpy()
    moved, keep = transform_boxes([box], plan)
    moved = moved[0]
    # independent expectation: the rectangle after crop/resize/flip, its corners moved, clipped as a polygon
    before_affine, _ = transform_boxes([box], dataclasses.replace(plan, affine=None))
    bx0, by0, bx1, by1 = before_affine[0].tolist()
    corners = [(bx0, by0), (bx1, by0), (bx1, by1), (bx0, by1)]
    if plan.affine is not None:
        matrix = np.reshape(plan.affine, (2, 3))
        corners = [tuple(matrix @ [x, y, 1.0]) for x, y in corners]
    visible = clip_polygon(corners, plan.size[1], plan.size[0])
    expected = None
    if visible:
        xs, ys = zip(*visible, strict=True)
        expected = np.array([min(xs), min(ys), max(xs), max(ys)])
    thin_before_affine = min(bx1 - bx0, by1 - by0) < 3
    if thin_before_affine or expected is None or min(expected[2:] - expected[:2]) < 3:
        assert white.sum() <= 4 * max(plan.size)  # at most a sliver survives filtering
        return
    assert keep[0]
    rows, columns = np.nonzero(white)
    measured = np.array([columns.min(), rows.min(), columns.max() + 1, rows.max() + 1], dtype=float)
    # what is visible lies inside the clipped polygon, and transform_boxes encloses it
    assert (measured[:2] >= expected[:2] - 2).all() and (measured[2:] <= expected[2:] + 2).all()
    assert (moved[:2] <= measured[:2] + 2).all() and (moved[2:] >= measured[2:] - 2).all()
    if len(visible) == 4 and np.allclose(visible, corners):
        # no corner left the image: all three agree (a clipped wedge's thin tip is below threshold,
        # so only this case can be compared both ways)
        np.testing.assert_allclose(measured, expected, atol=2.0)
        np.testing.assert_allclose(moved, measured, atol=2.0)


def test_rotated_and_sheared_rectangle_renders_where_its_box_says():
    pixels = np.zeros((100, 100, 3), np.uint8)
    pixels[40:60, 30:70] = 255
    matrix = geometric_op_matrix("shear_y", -0.21, (80, 80)) @ geometric_op_matrix("rotate", 21.0, (80, 80))
    affine = tuple(matrix[:2].ravel())
    plan = AugmentPlan((10.0, 10.0, 90.0, 90.0), True, (80, 80), affine, (), fill=(0, 0, 0))
    white = (render_plan(Image.fromarray(pixels), plan, RAW_PIXELS)[0] > 0.5).numpy()
    rows, columns = np.nonzero(white)
    measured = [columns.min(), rows.min(), columns.max() + 1, rows.max() + 1]
    moved, keep = transform_boxes([[30, 40, 70, 60]], plan)
    assert keep[0]
    np.testing.assert_allclose(moved[0], measured, atol=1.5)


def test_clip_normalisation_and_grey_fill():
    pixels = np.full((10, 20, 3), (200, 100, 50), np.uint8)
    shift = geometric_op_matrix("translate_x", 8.0, (10, 10))  # moves content 8 px left
    plan = AugmentPlan((0.0, 0.0, 20.0, 10.0), False, (10, 10), tuple(shift[:2].ravel()), ())
    rendered = render_plan(Image.fromarray(pixels), plan, TransformConfig())
    assert rendered.dtype == torch.float32 and rendered.shape == (3, 10, 10)
    for channel, value in enumerate((200, 100, 50)):
        expected = (value / 255 - CLIP_MEAN[channel]) / CLIP_STD[channel]
        assert rendered[channel, :, :1].allclose(torch.tensor(expected), atol=1e-5)
        fill = (128 / 255 - CLIP_MEAN[channel]) / CLIP_STD[channel]
        assert rendered[channel, :, -1:].allclose(torch.tensor(fill), atol=1e-5)


def test_photometric_ops_render():
    pixels = np.full((8, 8, 3), 100, np.uint8)
    pixels[:4] = 50
    base = AugmentPlan((0.0, 0.0, 8.0, 8.0), False, (8, 8), None, ())

    def render(*ops):
        return render_plan(Image.fromarray(pixels), dataclasses.replace(base, photometric=ops), RAW_PIXELS)

    assert render(("brightness", 1.36))[0, 7, 0].item() == pytest.approx(136 / 255)
    stretched = render(("autocontrast", 1.0))
    # each channel's [50, 100] stretched to [0, 255] (PIL, like ALBEF, truncates the top to 254)
    assert stretched[0, 0, 0].item() == 0.0
    assert stretched[0, 7, 0].item() == pytest.approx(1.0, abs=1.01 / 255)
    assert not torch.equal(render(("sharpness", 1.36)), render())  # the edge between rows 3 and 4 sharpens
    ramp = np.repeat((100 + np.arange(1024) % 64).astype(np.uint8).reshape(32, 32, 1), 3, axis=2)
    ramp_plan = AugmentPlan((0.0, 0.0, 32.0, 32.0), False, (32, 32), None, (("equalize", 1.0),))
    equalized = render_plan(Image.fromarray(ramp), ramp_plan, RAW_PIXELS)
    assert (equalized.min().item(), equalized.max().item()) == (0.0, 1.0)  # levels 100..163 spread out
    with pytest.raises(ValueError, match="unknown photometric op 'posterize'"):
        render(("posterize", 4.0))


def test_decode_image_to_rgb_and_a_clear_error_on_garbage():
    grey = np.full((6, 9), 77, np.uint8)
    image = decode_image(encode(grey, "PNG"))
    assert image.mode == "RGB" and image.size == (9, 6) and image.getpixel((0, 0)) == (77, 77, 77)
    with pytest.raises(ValueError) as error:
        decode_image(b"not an image at all")
    assert str(error.value).startswith(
        "cannot decode image: 19 bytes starting b'not an i' are not a readable JPEG/PNG/WebP (")
    assert str(error.value).endswith("); skip the sample or rebuild the shard from a good image")


def test_sixteen_bit_grey_is_scaled_to_eight_bits_not_clipped():
    """A mid-grey 16-bit PNG used to decode nearly white (Pillow's convert clips at 255)."""
    values = np.linspace(0, 65535, 256).round().astype(np.uint16).reshape(16, 16)
    image = decode_image(encode(values, "PNG"))
    pixels = np.asarray(image)
    assert image.mode == "RGB" and pixels.mean() == 127.5
    np.testing.assert_array_equal(pixels, np.repeat(np.rint(values / 257)[..., None], 3, axis=2))


def test_float_and_32_bit_images_are_refused_with_a_reason():
    transform = PilTransform(TransformConfig(image_size=16))
    floats = encode(np.full((4, 4), 0.5, np.float32), "TIFF")
    with pytest.raises(ValueError) as error:
        transform({"__key__": "9", "__url__": "x.tar", "png": floats})
    assert error.value.reason == "unsupported image mode"
    assert str(error.value).startswith("png of sample '9' from 'x.tar': image mode F (32-bit float) has no "
                                       "8-bit range that Pillow and DALI agree on; convert the image")


def scene_sample(key: str = "000001") -> dict:
    pixels = np.zeros((90, 120, 3), np.uint8)
    pixels[20:60, 10:50] = (255, 0, 0)
    return {
        "__key__": key, "__url__": "shard-000000.tar", "jpg": encode(pixels),
        "txt": "a red square on the left",
        "json": {"width": 120, "height": 90, "regions": [
            {"box": [10, 20, 50, 60], "text": "red square", "span": [2, 12]},
            {"box": [80, 5, 115, 40], "text": "left part", "span": [20, 24]},
        ]},
    }


def test_same_seed_same_outputs_and_new_epochs_give_new_views():
    config = TransformConfig(image_size=32)
    first, second = PilTransform(config, seed=1), PilTransform(config, seed=1)
    outputs = [[transform(scene_sample(str(index))) for index in range(4)] for transform in (first, second)]
    for left, right in zip(*outputs, strict=True):
        assert left["plan"] == right["plan"] and torch.equal(left["image"], right["image"])
    pickled = pickle.loads(pickle.dumps(PilTransform(config, seed=1)))
    assert pickled(scene_sample("0"))["plan"] == outputs[0][0]["plan"]
    views = set()
    for epoch in range(6):
        transform = PilTransform(config, seed=1)
        transform.set_epoch(epoch)
        views.add(transform(scene_sample())["plan"])
    assert len(views) == 6
    assert PilTransform(config, seed=1, epoch=5)(scene_sample())["plan"] in views
    persistent = PilTransform(config, seed=1)  # a long-lived worker sees the same key again
    assert persistent(scene_sample())["plan"] != persistent(scene_sample())["plan"]
    assert PilTransform(config, seed=2)(scene_sample("0"))["plan"] != outputs[0][0]["plan"]


def test_transform_output_follows_the_plan():
    config = TransformConfig(image_size=48, hflip_prob=1.0, randaugment_ops=0)
    output = PilTransform(config, seed=0)(scene_sample())
    plan = output["plan"]
    assert plan.flip and output["image"].shape == (3, 48, 48)
    assert output["text"] == "a red square on the right"
    moved, keep = transform_boxes([[10, 20, 50, 60], [80, 5, 115, 40]], plan)
    regions = scene_sample()["json"]["regions"]
    kept_regions = [region for region, kept in zip(regions, keep, strict=True) if kept]
    assert [region["text"] for region in output["meta"]["regions"]] == [
        region["text"].replace("left", "right") for region in kept_regions]
    assert output["meta"]["regions"][0]["box"] == pytest.approx(moved[keep][0].tolist())


def test_region_crop_keeps_one_region_inside():
    config = TransformConfig(image_size=32, region_crop=True)
    transform = PilTransform(config, seed=3)
    for index in range(20):
        x0, y0, x1, y1 = transform(scene_sample(str(index)))["plan"].crop
        assert any(x0 <= box[0] and y0 <= box[1] and box[2] <= x1 and box[3] <= y1
                   for box in ([10, 20, 50, 60], [80, 5, 115, 40]))


def two_image_sample(key: str) -> dict:
    pixels = np.full((40, 50, 3), 90, np.uint8)
    return {"__key__": key, "0.jpg": encode(pixels), "1.jpg": encode(pixels[:30]),
            "txt": "the left image has more dogs", "json": {"label": True}}


def test_two_image_samples_and_collate_shapes():
    transform = PilTransform(TransformConfig(image_size=24, hflip_prob=1.0), seed=0)
    pairs = [transform(two_image_sample(str(index))) for index in range(3)]
    assert pairs[0]["image"].shape == (2, 3, 24, 24) and len(pairs[0]["plan"]) == 2
    assert pairs[0]["text"] == "the left image has more dogs" and pairs[0]["meta"] == {"label": True}
    batch = collate(pairs)
    assert batch["image"].shape == (3, 2, 3, 24, 24) and batch["__key__"] == ["0", "1", "2"]
    singles = [PilTransform(TransformConfig(image_size=24))(scene_sample(str(index))) for index in range(5)]
    batch = collate(singles)
    assert set(batch) == {"__key__", "image", "text", "meta"}
    assert batch["image"].shape == (5, 3, 24, 24) and len(batch["text"]) == len(batch["meta"]) == 5
    with pytest.raises(ValueError, match=r"do not mix one-image and two-image samples in a batch"):
        collate(singles + pairs)
    with pytest.raises(ValueError, match="collate got an empty list of samples"):
        collate([])


def test_bad_samples_name_the_key_and_the_problem():
    transform = PilTransform(TransformConfig(image_size=16))
    expected = (r"sample '7' from 'x.tar' has no image: expected a jpg/png/webp member "
                r"or 0.jpg and 1.jpg, found \['json', 'txt'\]")
    with pytest.raises(ValueError, match=expected):
        transform({"__key__": "7", "__url__": "x.tar", "txt": "t", "json": {}})
    with pytest.raises(ValueError, match=r"sample '8' from 'x.tar': cannot decode image: 3 bytes"):
        transform({"__key__": "8", "__url__": "x.tar", "jpg": b"bad"})
