"""One sample of the shard builder: read and check its images, resize, convert boxes, make members.

``build_members(key, record, options)`` returns the tar members of one sample (image bytes, ``txt``,
``json``) with every box converted to xyxy pixels of the STORED image (rescaled when the image is
downscaled, clipped to it, dropped when empty), plus the clip and drop counts. A record that cannot be
used raises :class:`SampleRejected` with a stable reason the manifest counts. Used by
:mod:`data_shards.build`.

Images are stored as they are when both decoders read the right 8-bit RGB from them, else converted by
the rule of :mod:`data_shards.image_modes` (alpha laid on white, 16-bit scaled) and re-encoded: PNG from a
lossless source, JPEG from a JPEG or when resized; 32-bit integer and float images and images over
Pillow's decompression-bomb limit are rejected. The README's ``build`` section has the table.
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
from data_shards.image_modes import (
    SIXTEEN_BIT_GREY_MODES,
    ImageRejected,
    check_mode,
    has_transparency,
    open_image,
    to_rgb,
)
from data_shards.image_refs import REFUSED_REASON

# Source formats whose bytes are stored unchanged when no resize is needed (MPO is a camera JPEG) and
# the image's mode is one both decoders read as the same 8-bit RGB; everything else is re-encoded.
KEPT_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}
LOSSY_FORMATS = frozenset({"JPEG", "MPO"})
STORED_AS_IS_MODES = frozenset({"1", "L", "P", "RGB"})
WHITE = (255, 255, 255, 255)
EXIF_ORIENTATION = 0x0112


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
    exif_orientation: int | None = None  # the source's tag; stored pixels, size and boxes ignore it


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


def png_bit_depth(data: bytes) -> int:
    """Bits per channel from a PNG's IHDR (always the first chunk); Pillow opens 16-bit RGB as plain RGB."""
    return data[24] if data[12:16] == b"IHDR" else 8


def stored_as_is(image: Image.Image, data: bytes) -> bool:
    """Whether both decoders read the right 8-bit RGB straight from these bytes (the README's table)."""
    if image.mode not in STORED_AS_IS_MODES or has_transparency(image):
        return False
    return not (image.format == "PNG" and png_bit_depth(data) > 8)


def pixels_to_store(image: Image.Image) -> Image.Image:
    """8-bit L or RGB pixels to re-encode: 16-bit grey scaled as DALI scales it, transparent areas laid on
    white (what a viewer shows on a page, and img2dataset's choice), CMYK and palettes converted."""
    if image.mode in SIXTEEN_BIT_GREY_MODES:
        return to_rgb(image)
    if has_transparency(image):
        return Image.alpha_composite(Image.new("RGBA", image.size, WHITE), image.convert("RGBA")).convert("RGB")
    return image if image.mode in ("L", "RGB") else to_rgb(image)


def exif_orientation(image: Image.Image) -> int | None:
    """The EXIF orientation tag when it asks for a rotation or mirror (2-8), else None."""
    try:
        value = image.getexif().get(EXIF_ORIENTATION)
    except Exception:  # a broken EXIF block says nothing about the pixels, and decoders ignore it
        return None
    return value if isinstance(value, int) and 2 <= value <= 8 else None


def load_image(path: str, options: SampleOptions, origin: str = "") -> StoredImage:
    """The image as stored: its bytes when both decoders read them right and no resize is asked for, else
    the 8-bit pixels re-encoded (JPEG at ``options.jpeg_quality`` when resized or from a JPEG, PNG from a
    lossless source); SampleRejected with a counted reason for images that cannot be used."""
    data = read_image_bytes(path)
    name = f"{path} (record {origin})" if origin else path  # the warning of a huge image names both
    try:
        image = open_image(data, name)
        check_mode(image, name)
        with open_image(data) as probe:
            probe.verify()
        image.load()  # verify() misses truncated JPEGs; a full decode does not
    except ImageRejected as rejected:
        raise SampleRejected(rejected.reason, str(rejected)) from rejected
    except UnidentifiedImageError as error:  # its message holds a memory address; keep manifests stable
        raise SampleRejected("undecodable image", f"{path}: not an image format PIL knows") from error
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise SampleRejected("undecodable image", f"{path}: {error}") from error
    original = image.size
    size = stored_size(*original, options.resize_max_side)
    extension = KEPT_FORMATS.get(image.format or "")
    orientation = exif_orientation(image)
    if size == original and extension and stored_as_is(image, data):
        return StoredImage(extension, data, original, size, orientation)
    # Re-encoding drops the EXIF block: the stored pixels keep their orientation, as every reader here does.
    pixels = pixels_to_store(image)
    encoded = io.BytesIO()
    if size != original:
        pixels.resize(size, Image.Resampling.LANCZOS).save(encoded, "JPEG", quality=options.jpeg_quality)
        return StoredImage("jpg", encoded.getvalue(), original, size, orientation)
    if image.format in LOSSY_FORMATS:  # PNG would multiply a photo's size and restore nothing
        pixels.save(encoded, "JPEG", quality=options.jpeg_quality)
        return StoredImage("jpg", encoded.getvalue(), original, size, orientation)
    # A lossless source (alpha, 16-bit, GIF, TIFF, ...) stays lossless: JPEG would smear exactly the
    # graphics and flat colours such files hold, and the stored pixels are the converted ones exactly.
    pixels.save(encoded, "PNG")
    return StoredImage("png", encoded.getvalue(), original, size, orientation)


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
    images = [load_image(path, options, record.origin) for path in record.image_paths]
    # Boxes refer to the first image: no two-image format carries boxes.
    meta, clipped, dropped = convert_boxes(record.meta, images[0].original_size, images[0].size)
    if len(images) == 1:
        meta["width"], meta["height"] = images[0].size
        members = [(images[0].extension, images[0].data)]
    else:
        meta["width"] = [image.size[0] for image in images]
        meta["height"] = [image.size[1] for image in images]
        members = [(f"{index}.{image.extension}", image.data) for index, image in enumerate(images)]
    orientations = [image.exif_orientation for image in images]
    if any(orientations):  # lets a user find the images a viewer shows turned, unlike the stored pixels
        meta["exif_orientation"] = orientations[0] if len(images) == 1 else orientations
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
        with source, open_image(source, f"{path} (record {record.origin})") as image:
            original = image.size
        size = stored_size(*original, options.resize_max_side)
        _, clipped, dropped = convert_boxes(record.meta, original, size)
    except (OSError, SampleRejected, IndexError, SyntaxError, ValueError):
        return 0, 0  # the sample was valid when written; its images changed since, so nothing to recount
    return clipped, dropped
