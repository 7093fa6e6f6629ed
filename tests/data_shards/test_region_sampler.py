"""X-VLM's region sampling: crops keep the chosen box inside, boxes follow crop/resize/careful flip the way X-VLM's
dataset moves them, the share of each box inside the crop, and the choice of texts per image and per batch.

Run: ``.venv/bin/python -m pytest -q tests/data_shards/test_region_sampler.py``.
"""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
from PIL import Image

from data_shards.boxes import TransformConfig
from data_shards.region_sampler import RegionText, choose_texts, region_texts, sample_rng
from data_shards.transforms import PilTransform

SIZE = 48
# What the xvlm method's region stream asks of the loader (pretrain/methods.py).
REGION_TRANSFORM = TransformConfig(image_size=SIZE, region_crop=True, flip_text="skip", randaugment_geometric=False,
                                   randaugment_ops=2)
COLOURS = ((250, 0, 0), (0, 250, 0), (0, 0, 250))
BOXES = ([10, 20, 50, 60], [80, 5, 116, 40], [60, 70, 100, 110])  # xyxy source pixels of a 120 x 120 image


def region_sample(key: str, texts=("red square", "green square", "blue square")) -> dict:
    pixels = np.full((120, 120, 3), 128, np.uint8)
    for (x0, y0, x1, y1), colour in zip(BOXES, COLOURS, strict=True):
        pixels[y0:y1, x0:x1] = colour
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    regions = [{"box": list(box), "text": text, "label": "small" if index else None}
               for index, (box, text) in enumerate(zip(BOXES, texts, strict=True))]
    return {"__key__": key, "png": buffer.getvalue(), "txt": "three squares",
            "json": {"captions": ["three squares", "squares on grey"], "regions": regions}}


def xvlm_moved_box(box, crop, flip: bool):
    """X-VLM's RegionTextJsonDataset arithmetic: clip xywh to the crop, shift, mirror in the crop, scale."""
    x, y, w, h = box[0], box[1], box[2] - box[0], box[3] - box[1]
    x0, y0, crop_w, crop_h = crop[0], crop[1], crop[2] - crop[0], crop[3] - crop[1]
    xx, yy = max(x0, x), max(y0, y)
    xm, ym = min(x0 + crop_w, x + w), min(y0 + crop_h, y + h)
    x, y, w, h = xx - x0, yy - y0, xm - xx, ym - yy
    if flip:
        x = (crop_w - x) - w
    return [SIZE / crop_w * x, SIZE / crop_h * y, SIZE / crop_w * (x + w), SIZE / crop_h * (y + h)]


def inside_share(box, crop) -> float:
    """Counted pixel by pixel: the share of the box's pixels that the crop window keeps."""
    x0, y0, x1, y1 = (int(v) for v in box)
    cx0, cy0, cx1, cy1 = (int(v) for v in crop)
    kept = sum(1 for x in range(x0, x1) for y in range(y0, y1) if cx0 <= x < cx1 and cy0 <= y < cy1)
    return kept / ((x1 - x0) * (y1 - y0))


def test_boxes_stay_inside_the_crop_and_follow_it_as_x_vlm_moves_them():
    transform = PilTransform(REGION_TRANSFORM, seed=1)
    flips = checked = 0
    for index in range(40):
        output = transform(region_sample(f"s{index}"))
        plan, regions = output["plan"], output["meta"]["regions"]
        assert plan.affine is None  # photometric RandAugment only: boxes stay the rectangles the crop made
        crop = plan.crop
        # the chosen region's box lies wholly inside the crop
        assert any(crop[0] <= b[0] and crop[1] <= b[1] and b[2] <= crop[2] and b[3] <= crop[3] for b in BOXES)
        flips += plan.flip
        source = {region["text"]: box for region, box in zip(region_sample("x")["json"]["regions"], BOXES,
                                                               strict=True)}
        for region in regions:
            box = source[region["text"]]
            assert region["box"] == pytest.approx(xvlm_moved_box(box, crop, plan.flip), abs=1e-3)
            assert all(0 <= value <= SIZE for value in region["box"])
            assert region["visible"] == pytest.approx(inside_share(box, crop))
        # the pixels agree: a region's colour shows only inside its moved box (photometric ops recolour the grey)
        image = output["image"].numpy()
        checked += not plan.photometric
        for region in regions if not plan.photometric else ():
            colour = COLOURS[[r["text"] for r in region_sample("x")["json"]["regions"]].index(region["text"])]
            channel = int(np.argmax(colour))
            strong = image[channel] > 1.5  # normalised: a saturated channel, far above the grey background
            rows, columns = np.nonzero(strong)
            if rows.size:
                x0, y0, x1, y1 = region["box"]
                inside = (columns >= x0 - 1.5) & (columns <= x1 + 0.5) & (rows >= y0 - 1.5) & (rows <= y1 + 0.5)
                assert inside.mean() > 0.95
    assert 5 < flips < 35 and checked > 5


def test_careful_flip_never_flips_when_a_text_says_left_or_right():
    transform = PilTransform(TransformConfig(image_size=SIZE, region_crop=True, flip_text="skip", hflip_prob=1.0),
                             seed=0)
    said = [transform(region_sample(f"l{index}", texts=("red square", "the left square", "blue square")))
            for index in range(20)]
    assert not any(output["plan"].flip for output in said)
    texts = {region["text"] for output in said for region in output["meta"]["regions"]}
    assert texts <= {"red square", "the left square", "blue square"}  # no word swapped either
    plain = [transform(region_sample(f"p{index}"))["plan"].flip for index in range(20)]
    assert all(plain)


def meta_with(visible: list[float], captions=("a scene",)) -> dict:
    regions = [{"box": [i, i, i + 10.0, i + 10.0], "text": f"shape {i}", "label": "big" if i % 2 else None,
                "visible": share} for i, share in enumerate(visible)]
    return {"width": 32, "height": 24, "regions": regions, **({"captions": list(captions)} if captions else {})}


def test_the_caption_comes_first_then_regions_more_than_min_perc_inside():
    meta = meta_with([1.0, 0.5, 0.51, 0.2, 0.9])
    texts = region_texts(meta, random.Random(0), max_regions=5, min_perc_in_image=0.5)
    assert texts[0] == RegionText("a scene", (0.0, 0.0, 32.0, 24.0), True)
    # strictly more than min_perc_in_image (X-VLM's '>'); the attribute (label) is a prefix
    assert sorted(text.text for text in texts[1:]) == ["shape 0", "shape 2", "shape 4"]
    assert not any(text.is_image for text in texts[1:])
    assert {text.box for text in texts[1:]} == {(0.0, 0.0, 10.0, 10.0), (2.0, 2.0, 12.0, 12.0), (4.0, 4.0, 14.0, 14.0)}


def test_max_regions_counts_the_caption_and_records_without_caption_give_regions_only():
    meta = meta_with([1.0] * 8)
    assert len(region_texts(meta, random.Random(1), max_regions=5, min_perc_in_image=0.5)) == 5
    chosen = [tuple(t.text for t in region_texts(meta, random.Random(seed), max_regions=3, min_perc_in_image=0.5))
              for seed in range(20)]
    assert len(set(chosen)) > 5  # regions come in a random order
    without = region_texts(meta_with([1.0, 1.0], captions=()), random.Random(0), max_regions=5, min_perc_in_image=0.5)
    assert [text.is_image for text in without] == [False, False]
    labelled = region_texts(meta_with([0.0, 1.0], captions=()), random.Random(0), max_regions=5, min_perc_in_image=0.5)
    assert [text.text for text in labelled] == ["big shape 1"]


def test_the_same_augmented_sample_draws_the_same_texts():
    meta = meta_with([1.0] * 6)
    first = region_texts(meta, sample_rng("k", meta), max_regions=3, min_perc_in_image=0.5)
    assert first == region_texts(meta, sample_rng("k", meta), max_regions=3, min_perc_in_image=0.5)
    with pytest.raises(ValueError, match="no 'visible' share; read region shards with TransformConfig"):
        region_texts({"width": 4, "height": 4, "regions": [{"box": [0, 0, 1, 1], "text": "a"}]}, random.Random(0),
                     max_regions=2, min_perc_in_image=0.5)


def test_a_batch_takes_exactly_its_count_of_texts():
    rng = random.Random(0)
    enough = choose_texts(8, 20, rng)
    assert len(enough) == 8 and len(set(enough)) == 8
    padded = choose_texts(8, 5, rng)
    assert len(padded) == 8 and sorted(set(padded)) == [0, 1, 2, 3, 4] and padded[:5] == [0, 1, 2, 3, 4]
    repeated = choose_texts(8, 3, rng)
    assert repeated == [0, 1, 2, 0, 1, 2, 0, 1]
    with pytest.raises(ValueError, match="holds no region text"):
        choose_texts(8, 0, rng)
