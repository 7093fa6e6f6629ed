"""One sample of the shard builder: read and check its images, resize, convert boxes, make members.

``build_members(key, record, options)`` returns the tar members of one sample (image bytes, ``txt``,
``json``) with every box converted to xyxy pixels of the STORED image (rescaled when the image is
downscaled, clipped to it, dropped when empty), plus the clip and drop counts. A record that cannot be
used raises :class:`SampleRejected` with a stable reason the manifest counts. Used by
:mod:`data_shards.build`.
"""

from __future__ import annotations

import copy
import io
import json
import math
from collections import Counter
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from data_shards import storage
from data_shards.adapters import SourceRecord
from data_shards.image_refs import REFUSED_REASON

# Source formats whose bytes are stored unchanged when no resize is needed (MPO is a camera JPEG).
KEPT_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}


class SampleRejected(Exception):
    """A record that cannot become a sample; ``reason`` is counted, ``detail`` kept as an example."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class SampleOptions:
    resize_max_side: int | None
    jpeg_quality: int
    source: str


@dataclass(frozen=True)
class StoredImage:
    extension: str
    data: bytes
    original_size: tuple[int, int]
    size: tuple[int, int]


def stored_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """Only images larger than ``max_side`` shrink, keeping their aspect ratio."""
    if not max_side or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def read_image_bytes(path: str) -> bytes:
    """Image bytes from a local path (adapters resolve them against --image-root) or a URL."""
    if is_url(path):
        try:
            return storage.read_data_bytes(path)  # the path came from data: never a pipe: command
        except ValueError as error:
            raise SampleRejected(REFUSED_REASON, str(error)) from error
        except OSError as error:
            raise SampleRejected("unreadable image", str(error)) from error
    try:
        with open(path, "rb") as source:
            return source.read()
    except FileNotFoundError as error:
        raise SampleRejected("missing image", path) from error
    except OSError as error:
        raise SampleRejected("unreadable image", f"{path}: {error}") from error


def load_image(path: str, options: SampleOptions) -> StoredImage:
    data = read_image_bytes(path)
    try:
        with Image.open(io.BytesIO(data)) as probe:
            probe.verify()
        image = Image.open(io.BytesIO(data))
        image.load()  # verify() misses truncated JPEGs; a full decode does not
    except UnidentifiedImageError as error:  # its message holds a memory address; keep manifests stable
        raise SampleRejected("undecodable image", f"{path}: not an image format PIL knows") from error
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise SampleRejected("undecodable image", f"{path}: {error}") from error
    original = image.size
    size = stored_size(*original, options.resize_max_side)
    extension = KEPT_FORMATS.get(image.format or "")
    if size == original and extension:
        return StoredImage(extension, data, original, size)
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    if size != original:
        image = image.resize(size, Image.Resampling.LANCZOS)
    encoded = io.BytesIO()
    image.save(encoded, "JPEG", quality=options.jpeg_quality)
    return StoredImage("jpg", encoded.getvalue(), original, size)


def _fix_box(box, scale: tuple[float, float], size: tuple[int, int]) -> tuple[list | None, bool]:
    """(box in stored-image pixels clipped to the image or None when empty, whether clipping moved it)."""
    numbers = isinstance(box, list | tuple) and len(box) == 4 and all(
        isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        for value in box)
    if not numbers:
        raise SampleRejected("malformed box", repr(box)[:200])
    if scale != (1.0, 1.0):
        box = [round(box[0] * scale[0], 2), round(box[1] * scale[1], 2),
               round(box[2] * scale[0], 2), round(box[3] * scale[1], 2)]
    width, height = float(size[0]), float(size[1])
    clipped = [min(max(box[0], 0.0), width), min(max(box[1], 0.0), height),
               min(max(box[2], 0.0), width), min(max(box[3], 0.0), height)]
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        return None, False
    return clipped, clipped != list(box)


def convert_boxes(meta: dict, original: tuple[int, int], size: tuple[int, int]) -> tuple[dict, int, int]:
    """Meta with region, target and proposal boxes moved to the stored image; (meta, clipped, dropped)."""
    meta = copy.deepcopy(meta)
    scale = (size[0] / original[0], size[1] / original[1])
    counts = Counter()

    def kept(items: list) -> list:
        """Items (boxes, or dicts holding a ``box``) with moved boxes; empty ones dropped."""
        result = []
        for item in items:
            if isinstance(item, dict) and "box" not in item:
                raise SampleRejected("malformed record", f"entry without a box: {item!r}"[:200])
            box, was_clipped = _fix_box(item["box"] if isinstance(item, dict) else item, scale, size)
            if box is None:
                counts["dropped"] += 1
                continue
            counts["clipped"] += was_clipped
            result.append({**item, "box": box} if isinstance(item, dict) else box)
        return result

    for name in ("regions", "proposals"):  # regions hold dicts; proposals plain boxes or dicts
        if name in meta:
            if not isinstance(meta[name], list):
                raise SampleRejected("malformed record", f"{name} is not a list")
            meta[name] = kept(meta[name])
    if "box" in meta:
        box, was_clipped = _fix_box(meta["box"], scale, size)
        if box is None:
            raise SampleRejected("target box empty after clipping", repr(meta["box"]))
        meta["box"] = box
        counts["clipped"] += was_clipped
    return meta, counts["clipped"], counts["dropped"]


def build_members(key: str, record: SourceRecord, options: SampleOptions) -> tuple[list, int, int]:
    """The sample's (extension, bytes) members in a fixed order, and its box clip/drop counts."""
    if not isinstance(record.text, str) or not record.text.strip():
        raise SampleRejected("empty caption", "")
    if not record.image_paths:
        raise SampleRejected("malformed record", "no image path")
    if not isinstance(record.meta, dict):
        raise SampleRejected("malformed record", "meta is not a dict")
    images = [load_image(path, options) for path in record.image_paths]
    # Boxes refer to the first image: no two-image format carries boxes.
    meta, clipped, dropped = convert_boxes(record.meta, images[0].original_size, images[0].size)
    if len(images) == 1:
        meta["width"], meta["height"] = images[0].size
        members = [(images[0].extension, images[0].data)]
    else:
        meta["width"] = [image.size[0] for image in images]
        meta["height"] = [image.size[1] for image in images]
        members = [(f"{index}.{image.extension}", image.data) for index, image in enumerate(images)]
    meta.setdefault("source", options.source)
    meta["origin"] = record.origin
    try:
        members.append(("json", json.dumps(meta, sort_keys=True, ensure_ascii=False).encode()))
        members.append(("txt", record.text.encode()))
    except (TypeError, ValueError) as error:
        raise SampleRejected("malformed record", str(error)[:200]) from error
    return sorted(members), clipped, dropped


def count_box_fixes(record: SourceRecord, options: SampleOptions) -> tuple[int, int]:
    """Clip/drop counts of a sample already in a shard, from the image header alone (no decode)."""
    try:
        path = record.image_paths[0]
        source = storage.open_data_read(path) if is_url(path) else open(path, "rb")  # noqa: SIM115
        with source, Image.open(source) as image:
            original = image.size
        size = stored_size(*original, options.resize_max_side)
        _, clipped, dropped = convert_boxes(record.meta, original, size)
    except (OSError, ValueError, SampleRejected, IndexError):
        return 0, 0  # the sample was valid when written; its images changed since, so nothing to recount
    return clipped, dropped
