"""PIL/torchvision decoding path: decode image bytes, render an ``AugmentPlan``, batch the results.

This is the CPU fallback beside the DALI pipeline; both render the same plans from
``data_shards.boxes`` (crop -> bicubic resize -> flip -> bilinear affine with grey fill -> photometric
ops -> CLIP normalisation) and produce the same batch format (see ``collate``).

    transform = PilTransform(TransformConfig(image_size=256), seed=0)
    loader = DataLoader(samples.map(transform), batch_size=64, collate_fn=collate, num_workers=8)

Randomness: each call draws from ``sample_random(seed, epoch, call index, key)``, the call index
counting this instance's calls. The same seed, epoch and sample order give the same plans and pixels;
a new epoch (the ``epoch`` argument or ``set_epoch``, as with DistributedSampler) or a later call in a
long-lived (persistent) worker gives a new view of the same key.

Tests: ``.venv/bin/python -m pytest -q tests/data_shards/test_transforms.py``.
"""

from __future__ import annotations

import json
import random

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps, UnidentifiedImageError

from data_shards.boxes import (
    AugmentPlan,
    TransformConfig,
    invert_affine,
    plan_augment,
    sample_random,
    transform_meta,
    transform_text,
)
from data_shards.image_modes import ImageRejected, check_mode, open_image, sample_image_name, to_rgb

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def decode_image(data: bytes, name: str | None = None) -> Image.Image:
    """Decode image bytes to 8-bit RGB by the rule of ``data_shards.image_modes``, the pixels the DALI path
    gives. No EXIF rotation: boxes refer to the stored pixels. ``name`` (see ``sample_image_name``) goes
    into the decompression-bomb warning; images over twice that size or of a mode without an agreed 8-bit
    RGB (32-bit integer, float) raise ``ImageRejected``, a ValueError whose ``reason`` the loader counts."""
    try:
        image = open_image(data, name)
        check_mode(image, name)  # before decoding pixels that would be refused anyway
        image.load()
        return to_rgb(image, name)
    except ImageRejected:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(
            f"cannot decode image: {len(data)} bytes starting {bytes(data[:8])!r} are not a readable "
            f"JPEG/PNG/WebP ({error}); skip the sample or rebuild the shard from a good image"
        ) from error


def apply_photometric(image: Image.Image, name: str, value: float) -> Image.Image:
    """One photometric op as ``data_shards.boxes`` defines it, in PIL terms."""
    if name == "brightness":
        return ImageEnhance.Brightness(image).enhance(value)
    if name == "sharpness":
        return ImageEnhance.Sharpness(image).enhance(value)
    if name == "autocontrast":
        return ImageOps.autocontrast(image)
    if name == "equalize":
        return ImageOps.equalize(image)
    raise ValueError(f"unknown photometric op {name!r}; known: brightness, sharpness, autocontrast, equalize")


def render_plan(image: Image.Image, plan: AugmentPlan, config: TransformConfig) -> torch.Tensor:
    """Render ``plan`` on ``image``: float32 [3, H, W] normalised with ``config.mean``/``config.std``.

    Resize is bicubic (ALBEF's RandomResizedCrop); the affine is bilinear (ALBEF's cv2.warpAffine
    default), sampled dst -> src with ``invert_affine``; the DALI path uses the same filters.
    """
    height, width = plan.size
    image = to_rgb(image)
    image = image.resize((width, height), Image.Resampling.BICUBIC, box=plan.crop)
    if plan.flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if plan.affine is not None:
        image = image.transform(
            (width, height),
            Image.Transform.AFFINE,
            data=invert_affine(plan.affine),
            resample=Image.Resampling.BILINEAR,
            fillcolor=tuple(plan.fill),
        )
    for name, value in plan.photometric:
        image = apply_photometric(image, name, value)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(config.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(config.std, dtype=torch.float32).view(3, 1, 1)
    return ((pixels - mean) / std).contiguous()


def _as_text(value) -> str:
    if value is None:
        return ""
    return value.decode("utf-8") if isinstance(value, bytes | bytearray) else str(value)


def _as_meta(value) -> dict:
    if value is None:
        return {}
    if isinstance(value, bytes | bytearray | str):
        value = json.loads(value)
    if not isinstance(value, dict):
        raise ValueError(f"sample json must be an object, got {type(value).__name__}")
    return value


def _image_keys(sample: dict) -> list[str]:
    """The one image member, or the two of a two-image (NLVR2) sample, in order."""
    for extension in IMAGE_EXTENSIONS:
        if f"0.{extension}" in sample and f"1.{extension}" in sample:
            return [f"0.{extension}", f"1.{extension}"]
    for extension in IMAGE_EXTENSIONS:
        if extension in sample:
            return [extension]
    members = sorted(key for key in sample if not key.startswith("__"))
    raise ValueError(
        f"sample {sample.get('__key__')!r} from {sample.get('__url__')!r} has no image: expected a "
        f"jpg/png/webp member or 0.jpg and 1.jpg, found {members}"
    )


def _flip_check_text(text: str, meta: dict) -> str:
    """Everything "skip" mode (X-VLM careful_hflip) looks at for the words left/right."""
    parts = [text]
    for field in ("sentence", "question"):
        if isinstance(meta.get(field), str):
            parts.append(meta[field])
    parts += [caption for caption in meta.get("captions") or [] if isinstance(caption, str)]
    parts += [region["text"] for region in meta.get("regions") or [] if isinstance(region.get("text"), str)]
    return "\n".join(parts)


def _region_to_keep(rng: random.Random, meta: dict, width: int, height: int):
    """X-VLM's region crop anchor: a random region whose box has area inside the image, or None."""
    candidates = []
    for region in meta.get("regions") or []:
        x0, y0, x1, y1 = (float(value) for value in region.get("box", (0, 0, 0, 0)))
        if min(x1, width) > max(x0, 0) and min(y1, height) > max(y0, 0):
            candidates.append((x0, y0, x1, y1))
    return rng.choice(candidates) if candidates else None


class PilTransform:
    """Raw streaming sample -> ``{"__key__", "image", "text", "meta", "plan"}``; picklable."""

    def __init__(self, config: TransformConfig, seed: int = 0, epoch: int = 0):
        self.config = config
        self.seed = seed
        self.epoch = epoch
        self.calls = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _next_random(self, key: str, view: str | None = None) -> random.Random:
        # The reader names each view of a sample ("slot:count", restored on resume), so a resumed run
        # redraws the same augmentations; without it, a per-transform call counter stands in.
        if view is not None:
            return sample_random(self.seed, self.epoch, 0, f"{key}@{view}")
        rng = sample_random(self.seed, self.epoch, self.calls, key)
        self.calls += 1
        return rng

    def __call__(self, sample: dict) -> dict:
        key = str(sample.get("__key__", ""))
        image_keys = _image_keys(sample)
        text = _as_text(sample.get("txt"))
        meta = _as_meta(sample.get("json"))
        rng = self._next_random(key, sample.get("__view__"))
        try:
            images = [decode_image(sample[image_key], sample_image_name(sample, image_key))
                      for image_key in image_keys]
        except ImageRejected:
            raise  # its message names the sample already
        except ValueError as error:
            raise ValueError(f"sample {key!r} from {sample.get('__url__')!r}: {error}") from error
        check_text = _flip_check_text(text, meta)
        if len(images) == 2:
            # Two-image statements say "left image"/"right image" about the pair, not about the content
            # of either image, so the text and meta stay as they are (ALBEF's NLVR2 does the same).
            plans = tuple(plan_augment(rng, *image.size, self.config, text=check_text) for image in images)
            pixels = torch.stack(
                [render_plan(image, plan, self.config) for image, plan in zip(images, plans, strict=True)]
            )
            return {"__key__": key, "image": pixels, "text": text, "meta": dict(meta), "plan": plans}
        image = images[0]
        keep_box = None
        if self.config.region_crop and self.config.train:
            keep_box = _region_to_keep(rng, meta, *image.size)
        plan = plan_augment(rng, *image.size, self.config, keep_box=keep_box, text=check_text)
        return {
            "__key__": key,
            "image": render_plan(image, plan, self.config),
            "text": transform_text(text, plan, self.config),
            "meta": transform_meta(meta, plan, self.config, caption=text),
            "plan": plan,
        }


def collate(samples: list[dict]) -> dict:
    """The batch contract both backends produce: keys, stacked images [B,3,H,W] (or [B,2,3,H,W]),
    texts and metas as lists."""
    if not samples:
        raise ValueError("collate got an empty list of samples")
    shapes = sorted({tuple(sample["image"].shape) for sample in samples})
    if len(shapes) > 1:
        raise ValueError(
            f"collate: images in one batch must share a shape, got {shapes}; use one image_size and "
            "do not mix one-image and two-image samples in a batch"
        )
    return {
        "__key__": [sample["__key__"] for sample in samples],
        "image": torch.stack([sample["image"] for sample in samples]),
        "text": [sample["text"] for sample in samples],
        "meta": [sample["meta"] for sample in samples],
    }
