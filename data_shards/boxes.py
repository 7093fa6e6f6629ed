"""Box-aware augmentation plans shared by the PIL and DALI decoding paths.

Every random geometric choice for one image (crop window, flip, RandAugment ops) is drawn once, in
Python, into an ``AugmentPlan``. Each backend renders that plan on the pixels (PIL in
``data_shards.transforms``, DALI in ``data_shards.dali_pipeline``) and the pure-numpy functions here
move the boxes, so both paths see the same geometry and every box follows every crop, resize, flip
and affine op. Pure numpy + stdlib: no torch or PIL import.

Rendering order (both backends): crop ``plan.crop`` -> resize to ``plan.size`` (bicubic) -> horizontal
flip -> affine ``plan.affine`` (bilinear, fill ``plan.fill``) -> photometric ops in order -> normalise.

Coordinates are continuous pixel coordinates: pixel (row i, column j) covers [j, j+1) x [i, i+1), so
its centre is (j + 0.5, i + 0.5) and an image of width W spans [0, W]. Boxes are xyxy in these units.
``plan.affine`` is the FORWARD 2x3 matrix (a, b, c, d, e, f): a point (x, y) of the resized and flipped
image lands at (a*x + b*y + c, d*x + e*y + f) of the output (the OpenCV ``warpAffine`` convention that
ALBEF's RandomAugment uses). Renderers that sample dst -> src (PIL ``Image.transform``, DALI
``warp_affine`` with its default ``inverse_map=True``) pass ``invert_affine(plan.affine)``.

Photometric ops, as ALBEF defines them: ``brightness`` multiplies values by the factor (clipped to 255);
``sharpness`` blends the image with its 3x3 smoothed copy (kernel [[1,1,1],[1,5,1],[1,1,1]] / 13);
``autocontrast`` stretches each channel's [min, max] to [0, 255]; ``equalize`` equalises each channel's
histogram. Geometric ops are composed into the one affine and photometric ops run after it; ALBEF
interleaves them, which differs only in how the grey fill is recoloured.

Tests: ``.venv/bin/python -m pytest -q tests/data_shards/test_boxes.py``.
"""

from __future__ import annotations

import copy
import hashlib
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from data_shards.mdetr_crop import mdetr_crop_window

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

FLIP_TEXT_MODES = ("swap", "skip", "none")
CROP_MODES = ("random_resized", "mdetr", "none")  # mdetr: PEVL's random resize + size crop (data_shards.mdetr_crop);
# none: the whole image, resized (every box stays in view; flips and RandAugment still apply)
# ALBEF RandomAugment op set (colour ops excluded there, so here too).
RANDAUGMENT_OPS = ("identity", "autocontrast", "equalize", "brightness", "sharpness",
                   "shear_x", "shear_y", "translate_x", "translate_y", "rotate")
GEOMETRIC_OPS = ("shear_x", "shear_y", "translate_x", "translate_y", "rotate")
PHOTOMETRIC_OPS = tuple(name for name in RANDAUGMENT_OPS if name not in GEOMETRIC_OPS)
RANDAUGMENT_MAX_LEVEL = 10
# Fields of a sample's json whose strings talk about the image and follow a left/right swap.
SWAPPED_META_FIELDS = ("captions", "sentence", "question", "answers", "text")

# "left"/"right" (and -most) as whole words: "leftover" and "righteous" stay untouched.
_LEFT_RIGHT_WORD = re.compile(r"\b(left|right)(most)?\b", re.IGNORECASE)


@dataclass(frozen=True)
class TransformConfig:
    image_size: int = 256
    train: bool = True  # False: deterministic resize to (image_size, image_size), nothing random
    crop_scale: tuple[float, float] = (0.2, 1.0)  # RandomResizedCrop area fraction
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip_prob: float = 0.5
    randaugment_ops: int = 2  # 0 = off; ALBEF RandomAugment(2, 7)
    randaugment_magnitude: int = 7
    region_crop: bool = False  # X-VLM: random crop keeping a chosen region box inside, then square resize
    flip_text: str = "swap"  # "swap" left<->right words; "skip" = X-VLM careful_hflip; "none"
    crop_mode: str = "random_resized"  # or "mdetr" (PEVL), "none"; crop_scale / crop_ratio: random_resized
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    # X-VLM's region batches run RandomAugment over the photometric ops only (no shear, translate or rotate),
    # so that a box stays the rectangle the crop made of it.
    randaugment_geometric: bool = True

    def __post_init__(self) -> None:
        problems = []
        if self.image_size <= 0:
            problems.append(f"image_size must be positive, got {self.image_size}")
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            problems.append(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        low, high = self.crop_ratio
        if not 0 < low <= high:
            problems.append(f"crop_ratio must satisfy 0 < low <= high, got {self.crop_ratio}")
        if not 0 <= self.hflip_prob <= 1:
            problems.append(f"hflip_prob must be in [0, 1], got {self.hflip_prob}")
        if self.randaugment_ops < 0:
            problems.append(f"randaugment_ops must be >= 0, got {self.randaugment_ops}")
        if not 0 <= self.randaugment_magnitude <= RANDAUGMENT_MAX_LEVEL:
            problems.append(f"randaugment_magnitude must be in [0, 10], got {self.randaugment_magnitude}")
        if self.crop_mode not in CROP_MODES:
            problems.append(f"crop_mode must be one of {', '.join(CROP_MODES)}, got {self.crop_mode!r}")
        if self.flip_text not in FLIP_TEXT_MODES:
            problems.append(f"flip_text must be one of {', '.join(FLIP_TEXT_MODES)}, got {self.flip_text!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            problems.append(f"mean and std need 3 values each, std positive; got {self.mean}, {self.std}")
        if problems:
            raise ValueError("invalid TransformConfig: " + "; ".join(problems))


@dataclass(frozen=True)
class AugmentPlan:
    crop: tuple[float, float, float, float]  # x0, y0, x1, y1 in source pixels
    flip: bool
    size: tuple[int, int]  # output (height, width)
    affine: tuple[float, ...] | None  # forward 2x3 row-major in output pixels; None: no geometric op
    photometric: tuple[tuple[str, float], ...]  # applied in order after the affine
    fill: tuple[int, int, int] = (128, 128, 128)


def sample_random(seed: int, epoch: int, index: int, key: str) -> random.Random:
    """A generator for one view of one sample; a stable hash (not Python's salted ``hash``)."""
    text = f"{seed}\x00{epoch}\x00{index}\x00{key}".encode()
    return random.Random(int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big"))


def random_resized_crop(
    rng: random.Random, width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[float, float, float, float]:
    """torchvision's RandomResizedCrop window rule (10 tries, then a centre crop), integer-aligned."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        crop_width = int(round(math.sqrt(target_area * aspect)))
        crop_height = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            left = rng.randint(0, width - crop_width)
            top = rng.randint(0, height - crop_height)
            return (float(left), float(top), float(left + crop_width), float(top + crop_height))
    if width / height < ratio[0]:
        crop_width, crop_height = width, int(round(width / ratio[0]))
    elif width / height > ratio[1]:
        crop_width, crop_height = int(round(height * ratio[1])), height
    else:
        crop_width, crop_height = width, height
    left, top = (width - crop_width) // 2, (height - crop_height) // 2
    return (float(left), float(top), float(left + crop_width), float(top + crop_height))


def crop_window_for_box(
    rng: random.Random, box, width: int, height: int
) -> tuple[float, float, float, float]:
    """X-VLM's region crop: each crop edge is drawn uniformly between the image edge and the box edge,
    so the (clipped) box always lies fully inside the window."""
    x0, y0, x1, y1 = (float(value) for value in box)
    x0, x1 = min(max(x0, 0.0), width), min(max(x1, 0.0), width)
    y0, y1 = min(max(y0, 0.0), height), min(max(y1, 0.0), height)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"region box {list(box)} has no area inside the {width}x{height} image")
    left = rng.randint(0, math.floor(x0))
    top = rng.randint(0, math.floor(y0))
    right = rng.randint(min(math.ceil(x1), width), width)
    bottom = rng.randint(min(math.ceil(y1), height), height)
    return (float(left), float(top), float(right), float(bottom))


def randaugment_value(name: str, magnitude: int) -> float:
    """ALBEF's level -> argument rule (before the random sign of geometric ops)."""
    level = magnitude / RANDAUGMENT_MAX_LEVEL
    if name in ("brightness", "sharpness"):
        return round(level * 1.8 + 0.1, 6)
    if name in ("shear_x", "shear_y"):
        return round(level * 0.3, 6)
    if name in ("translate_x", "translate_y"):
        return round(level * 10.0, 6)  # pixels, as ALBEF (not scaled with the image size)
    if name == "rotate":
        return round(level * 30.0, 6)  # degrees
    if name in ("identity", "autocontrast", "equalize"):
        return 1.0
    raise ValueError(f"unknown RandAugment op {name!r}; known: {', '.join(RANDAUGMENT_OPS)}")


def geometric_op_matrix(name: str, value: float, size: tuple[int, int]) -> np.ndarray:
    """Forward 3x3 matrix of one geometric op on an image of ``size`` (height, width), ALBEF's
    definitions: shear about the top-left origin, translate by -value, rotate ``value`` degrees
    counter-clockwise (as seen on screen) about the image centre."""
    height, width = size
    if name == "shear_x":
        return np.array([[1.0, value, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    if name == "shear_y":
        return np.array([[1.0, 0.0, 0.0], [value, 1.0, 0.0], [0.0, 0.0, 1.0]])
    if name == "translate_x":
        return np.array([[1.0, 0.0, -value], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    if name == "translate_y":
        return np.array([[1.0, 0.0, 0.0], [0.0, 1.0, -value], [0.0, 0.0, 1.0]])
    if name == "rotate":
        cos, sin = math.cos(math.radians(value)), math.sin(math.radians(value))
        centre_x, centre_y = width / 2, height / 2
        return np.array([
            [cos, sin, (1 - cos) * centre_x - sin * centre_y],
            [-sin, cos, sin * centre_x + (1 - cos) * centre_y],
            [0.0, 0.0, 1.0],
        ])
    raise ValueError(f"unknown geometric op {name!r}; known: {', '.join(GEOMETRIC_OPS)}")


def invert_affine(affine) -> tuple[float, ...]:
    """The dst -> src 2x3 matrix (row-major) for a forward 2x3 matrix."""
    matrix = np.vstack([np.asarray(affine, dtype=np.float64).reshape(2, 3), [0.0, 0.0, 1.0]])
    return tuple(float(value) for value in np.linalg.inv(matrix)[:2].ravel())


def draw_randaugment(
    rng: random.Random, num_ops: int, magnitude: int, size: tuple[int, int], ops: tuple[str, ...] = RANDAUGMENT_OPS
) -> tuple[tuple[float, ...] | None, tuple[tuple[str, float], ...]]:
    """ALBEF RandomAugment(num_ops, magnitude): ops drawn with replacement from ``ops``, each applied with
    p 0.5; geometric ops get a random sign. Returns (composed forward affine or None, photometric ops)."""
    composed = None
    photometric = []
    for _ in range(num_ops):
        name = rng.choice(ops)
        if rng.random() > 0.5:
            continue
        value = randaugment_value(name, magnitude)
        if name in GEOMETRIC_OPS:
            if rng.random() > 0.5:
                value = -value
            matrix = geometric_op_matrix(name, value, size)
            composed = matrix if composed is None else matrix @ composed
        elif name != "identity":
            photometric.append((name, value))
    affine = None if composed is None else tuple(float(value) for value in composed[:2].ravel())
    return affine, tuple(photometric)


def mentions_left_or_right(text: str) -> bool:
    return _LEFT_RIGHT_WORD.search(text) is not None


def plan_augment(
    rng: random.Random, width: int, height: int, config: TransformConfig, *, keep_box=None, text: str = ""
) -> AugmentPlan:
    """Draw every random choice for one image of ``width`` x ``height``.

    ``keep_box`` (xyxy source pixels) is used only with ``config.region_crop``; without one the
    RandomResizedCrop window is drawn instead. ``text`` is what "skip" mode checks for left/right.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    size = (config.image_size, config.image_size)
    if not config.train:
        return AugmentPlan((0.0, 0.0, float(width), float(height)), False, size, None, ())
    if config.region_crop and keep_box is not None:
        crop = crop_window_for_box(rng, keep_box, width, height)
    elif config.crop_mode == "mdetr":
        crop = mdetr_crop_window(rng, width, height)
    elif config.crop_mode == "none":
        crop = (0.0, 0.0, float(width), float(height))
    else:
        crop = random_resized_crop(rng, width, height, config.crop_scale, config.crop_ratio)
    flip = rng.random() < config.hflip_prob
    if flip and config.flip_text == "skip" and mentions_left_or_right(text):
        flip = False
    ops = RANDAUGMENT_OPS if config.randaugment_geometric else PHOTOMETRIC_OPS
    affine, photometric = draw_randaugment(rng, config.randaugment_ops, config.randaugment_magnitude, size, ops)
    return AugmentPlan(crop, flip, size, affine, photometric)


def _clip(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, width)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, height)
    return boxes


def _has_area(boxes: np.ndarray, min_side: float) -> np.ndarray:
    return (boxes[:, 2] - boxes[:, 0] >= min_side) & (boxes[:, 3] - boxes[:, 1] >= min_side)


def transform_boxes(boxes, plan: AugmentPlan, *, min_side: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Move (N, 4) xyxy source-pixel boxes through ``plan``.

    Returns float32 (N, 4) xyxy output-pixel boxes clipped to the output image, and a bool keep-mask
    that is False where a box is narrower or shorter than ``min_side`` pixels after the crop or after
    the affine. Boxes are clipped to the crop before the affine (the cropped-away part is gone from the
    pixels too); the affine moves the 4 corners and takes their enclosing box.
    """
    boxes = np.array(boxes, dtype=np.float64)
    if boxes.size == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape (N, 4) as xyxy, got {boxes.shape}")
    height, width = plan.size
    crop_x0, crop_y0, crop_x1, crop_y1 = plan.crop
    boxes[:, [0, 2]] = (boxes[:, [0, 2]] - crop_x0) * (width / (crop_x1 - crop_x0))
    boxes[:, [1, 3]] = (boxes[:, [1, 3]] - crop_y0) * (height / (crop_y1 - crop_y0))
    boxes = _clip(boxes, width, height)
    if plan.flip:
        boxes[:, [0, 2]] = width - boxes[:, [2, 0]]
    keep = _has_area(boxes, min_side)
    if plan.affine is not None:
        matrix = np.asarray(plan.affine, dtype=np.float64).reshape(2, 3)
        xs, ys = boxes[:, [0, 2, 2, 0]], boxes[:, [1, 1, 3, 3]]
        moved_x = matrix[0, 0] * xs + matrix[0, 1] * ys + matrix[0, 2]
        moved_y = matrix[1, 0] * xs + matrix[1, 1] * ys + matrix[1, 2]
        boxes = np.stack([moved_x.min(1), moved_y.min(1), moved_x.max(1), moved_y.max(1)], axis=1)
        boxes = _clip(boxes, width, height)
        keep &= _has_area(boxes, min_side)
    return boxes.astype(np.float32), keep


def visible_fractions(boxes, crop) -> np.ndarray:
    """The share of each (N, 4) xyxy source box's area that lies inside the ``crop`` window (0 for an empty box)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    crop_x0, crop_y0, crop_x1, crop_y1 = crop
    width = np.clip(np.minimum(boxes[:, 2], crop_x1) - np.maximum(boxes[:, 0], crop_x0), 0, None)
    height = np.clip(np.minimum(boxes[:, 3], crop_y1) - np.maximum(boxes[:, 1], crop_y0), 0, None)
    area = (boxes[:, 2] - boxes[:, 0]).clip(0) * (boxes[:, 3] - boxes[:, 1]).clip(0)
    return np.where(area > 0, width * height / np.where(area > 0, area, 1.0), 0.0)


def _swap_word(match: re.Match) -> str:
    word = match.group(0)
    swapped = ("right" if match.group(1).lower() == "left" else "left") + (match.group(2) or "").lower()
    if word.isupper():
        return swapped.upper()
    return swapped.capitalize() if word[0].isupper() else swapped


def swap_left_right(text: str) -> tuple[str, Callable[[int], int]]:
    """Swap the words left/right (case kept) and return a map from old to new character offsets,
    so caption spans can follow ("left" and "right" differ in length)."""
    edits = []  # (old start, old end, new length)
    pieces = []
    previous_end = 0
    for match in _LEFT_RIGHT_WORD.finditer(text):
        replacement = _swap_word(match)
        pieces += [text[previous_end:match.start()], replacement]
        edits.append((match.start(), match.end(), len(replacement)))
        previous_end = match.end()
    pieces.append(text[previous_end:])

    def new_offset(offset: int) -> int:
        shift = 0
        for start, end, new_length in edits:
            if offset >= end:
                shift += new_length - (end - start)
            elif offset > start:
                return start + shift + min(offset - start, new_length)
            else:
                break
        return offset + shift

    return "".join(pieces), new_offset


def _text_is_swapped(plan: AugmentPlan, config: TransformConfig) -> bool:
    return plan.flip and config.flip_text == "swap"


def transform_text(text: str, plan: AugmentPlan, config: TransformConfig) -> str:
    """The text as seen with the augmented image: left/right swapped when the plan flips in "swap" mode."""
    return swap_left_right(text)[0] if _text_is_swapped(plan, config) else text


def _swap_strings(value):
    if isinstance(value, str):
        return swap_left_right(value)[0]
    if isinstance(value, list | tuple):
        return type(value)(_swap_strings(item) for item in value)
    if isinstance(value, dict):
        return {key: _swap_strings(item) for key, item in value.items()}
    return value


def _moved_list(box_values, plan: AugmentPlan) -> list[float]:
    return [float(value) for value in transform_boxes([box_values], plan)[0][0]]


def transform_meta(
    meta: dict, plan: AugmentPlan, config: TransformConfig, *, caption: str | None = None
) -> dict:
    """A new meta whose boxes and texts match the augmented image; ``meta`` is not modified.

    ``regions[*].box`` move (regions whose box vanished are dropped, order kept; a dropped region with an
    ``index`` and a ``label``, an object that texts refer to by number as VCR's do, is listed as ``{index, label}``
    under ``cropped_out`` so that those texts can still name it); with ``config.region_crop``
    each kept region also gets ``visible``, the share of its source box's area inside the crop window (what
    X-VLM's ``min_perc_in_image`` tests), ``box`` (RefCOCO
    target) and ``proposals`` move and are kept even when clipped; ``width``/``height`` become the
    output size. On a "swap" flip the region ``text`` and the fields in ``SWAPPED_META_FIELDS`` swap
    left/right, and region ``span`` offsets are remapped into the swapped ``caption`` (the sample's
    txt, which must then be given).
    """
    result = copy.deepcopy(meta)
    swapped = _text_is_swapped(plan, config)
    height, width = plan.size
    result["width"], result["height"] = width, height
    regions = meta.get("regions") or []
    if regions:
        for index, region in enumerate(regions):
            if "box" not in region:
                raise ValueError(f"meta region {index} has no 'box' (keys: {sorted(region)})")
        has_spans = any("span" in region for region in regions)
        if swapped and has_spans and caption is None:
            raise ValueError(
                "transform_meta: regions carry caption spans and the plan swaps left/right; "
                "pass caption=<the sample's txt> so the spans can follow the swapped words"
            )
        new_offset = swap_left_right(caption)[1] if swapped and has_spans else None
        source_boxes = [region["box"] for region in regions]
        moved, keep = transform_boxes(source_boxes, plan)
        visible = visible_fractions(source_boxes, plan.crop) if config.region_crop else None
        new_regions, cropped_out = [], []
        for index, (region, box, kept) in enumerate(zip(result["regions"], moved, keep, strict=True)):
            if not kept:
                if "index" in region and "label" in region:
                    cropped_out.append({"index": region["index"], "label": region["label"]})
                continue
            region["box"] = [float(value) for value in box]
            if visible is not None:
                region["visible"] = float(visible[index])
            if swapped and isinstance(region.get("text"), str):
                region["text"] = swap_left_right(region["text"])[0]
            if new_offset is not None and "span" in region:
                region["span"] = [new_offset(int(offset)) for offset in region["span"]]
            new_regions.append(region)
        result["regions"] = new_regions
        if cropped_out:
            result["cropped_out"] = cropped_out
    if meta.get("box") is not None:
        result["box"] = _moved_list(meta["box"], plan)
    for proposal_index, proposal in enumerate(meta.get("proposals") or []):
        if isinstance(proposal, dict):
            result["proposals"][proposal_index]["box"] = _moved_list(proposal["box"], plan)
        else:
            result["proposals"][proposal_index] = _moved_list(proposal, plan)
    if swapped:
        for field in SWAPPED_META_FIELDS:
            if field in result:
                result[field] = _swap_strings(result[field])
    return result
