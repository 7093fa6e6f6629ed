"""X-VLM's choice of region texts for one augmented image, and of a region batch's texts among all images.

The image itself is prepared by the loader with ``TransformConfig(region_crop=True, flip_text="skip")``: a
random region's box is kept inside a random crop, the flip is skipped when a text says left or right, boxes
follow the crop, resize and flip and are clipped to the crop, and each region records ``visible``, the share
of its source box inside the crop (``data_shards.boxes.transform_meta``). From that sample's meta,
``region_texts`` picks what X-VLM's ``RegionTextJsonDataset`` emits (reference/methods.md section 1):

1. the image caption first, when the record has one (one of its captions at random), with the whole image as
   its box and ``is_image`` set;
2. then the regions in random order whose box is more than ``min_perc_in_image`` inside the crop, each text
   prefixed by the region's attribute (``label``) when it has one, until ``max_regions`` texts in all.

``choose_texts`` then takes exactly ``count`` texts of a batch (X-VLM's region collate): a random ``count`` of
them when there are enough, else all of them plus a random draw of repeats (a warning in X-VLM, since repeated
texts are false negatives in the contrastive loss; keep ``count`` at or below what the batch offers).

Both take a ``random.Random``; ``sample_rng`` seeds one from what the sample is (its key and its augmented
boxes), so a resumed run, which redraws the same augmentation, also picks the same texts.

Tests: ``.venv/bin/python -m pytest -q tests/data_shards/test_region_sampler.py``.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class RegionText:
    text: str
    box: tuple[float, float, float, float]        # xyxy pixels of the augmented image (the image for a caption)
    is_image: bool                                 # the image's caption rather than a region's text


def sample_rng(key: str, meta: dict) -> random.Random:
    """A generator for one augmented sample: the same key and augmented boxes give the same draws."""
    regions = [(region.get("box"), region.get("text")) for region in meta.get("regions") or []]
    text = json.dumps([key, regions, meta.get("width"), meta.get("height")], default=str)
    return random.Random(int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big"))


def region_texts(meta: dict, rng: random.Random, *, max_regions: int, min_perc_in_image: float,
                 key: str = "") -> list[RegionText]:
    """Up to ``max_regions`` texts of one augmented sample (see the module docstring)."""
    width, height = meta.get("width"), meta.get("height")
    if width is None or height is None:
        raise ValueError(f"region sample {key!r}: its meta has no width/height; it must come from the loader's "
                         "transform (data_shards.boxes.transform_meta)")
    texts: list[RegionText] = []
    captions = [caption for caption in meta.get("captions") or [] if isinstance(caption, str) and caption.strip()]
    if captions:
        texts.append(RegionText(rng.choice(captions), (0.0, 0.0, float(width), float(height)), True))
    regions = list(meta.get("regions") or [])
    for region in rng.sample(regions, len(regions)):
        if len(texts) >= max_regions:
            break
        if "visible" not in region:
            raise ValueError(f"region sample {key!r}: a region has no 'visible' share; read region shards with "
                             "TransformConfig(region_crop=True)")
        if region["visible"] <= min_perc_in_image:
            continue
        label = region.get("label")
        text = f"{label} {region['text']}" if label else region["text"]
        texts.append(RegionText(text, tuple(float(value) for value in region["box"]), False))
    return texts


def choose_texts(count: int, available: int, rng: random.Random) -> list[int]:
    """Indices of exactly ``count`` texts out of ``available`` (X-VLM's region collate; see the module docstring)."""
    if available < 1:
        raise ValueError("a region batch holds no region text: no image caption and no region inside its crop")
    indices = list(range(available))
    if available >= count:
        return rng.sample(indices, count)
    if count - available <= available:
        return indices + rng.sample(indices, count - available)
    repeats = -(-count // available)
    return (indices * repeats)[:count]
