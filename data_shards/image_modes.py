"""Which images become pixels, and how each image mode becomes 8-bit RGB, for the builder and both decoders.

Pillow's ``convert("RGB")`` and DALI's ``decoders.image(output_type=RGB)`` agree on most modes but not on
all: Pillow clips 16-bit grey to 255 (a mid-grey turns white) where DALI scales it, and the two disagree
on 32-bit integer and float images. This module holds the one rule both read paths follow (measured with
Pillow 13 and DALI 2.4 in ``tests/data_shards/test_image_modes.py``):

  1, L (1-8 bit), P, RGB, CMYK   Pillow's conversion; DALI gives the same pixels (CMYK within 1 level:
                                 DALI truncates where Pillow rounds).
  LA, RGBA, PA, P/L/RGB with a transparent colour   the alpha channel is dropped and the stored colour
                                 kept, which is what DALI does with ``output_type=RGB``.
  I;16 (16-bit grey)             round(value / 257), DALI's scaling.
  16-bit RGB, RGBA, LA PNG       Pillow keeps the high byte, DALI rounds: within 1 level.
  I (32-bit integer), F (float)  no 8-bit range both agree on (DALI fails on I and multiplies F by 255,
                                 Pillow clips both): :class:`ImageRejected`, reason "unsupported image mode".

``open_image`` also applies Pillow's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``) with the
image's name in the message: a warning above the limit, :class:`ImageRejected` ("image too large") above
twice the limit, where Pillow refuses to open it. The builder (``data_shards.shard_samples``) adds its
own choices on top (what it stores as it is, what it re-encodes); the README's ``build`` section has the
table. Tests: ``.venv/bin/python -m pytest -q tests/data_shards/test_image_modes.py``.
"""

from __future__ import annotations

import io
import threading
import warnings
from typing import BinaryIO

import numpy as np
from PIL import Image, JpegImagePlugin, PngImagePlugin, WebPImagePlugin

from data_shards.tar_samples import SKIP_IMAGE_TOO_LARGE, SKIP_UNSUPPORTED_IMAGE_MODE

SIXTEEN_BIT_GREY_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
# Modes whose 8-bit RGB both decoders agree on; anything else is rejected rather than guessed.
CONVERTIBLE_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"}) \
    | SIXTEEN_BIT_GREY_MODES
MODE_NAMES = {"I": "32-bit integer", "F": "32-bit float"}

# Image.open runs its decompression-bomb check inside, warning without naming the image. For the shard
# formats the same header parsers Image.open would pick run here directly, so the size is checked with
# the image's name and the process-wide warnings filters stay untouched (changing them, even briefly,
# makes every once-per-place warning of the process show again).
_HEADER_PARSERS = (
    (lambda prefix: prefix.startswith(b"\x89PNG\r\n\x1a\n"), PngImagePlugin.PngImageFile),
    (lambda prefix: prefix[:3] == b"\xff\xd8\xff", JpegImagePlugin.jpeg_factory),  # MPO too, as Image.open
    (lambda prefix: prefix[:4] == b"RIFF" and prefix[8:12] == b"WEBP", WebPImagePlugin.WebPImageFile),
)
# Other formats go through Image.open with its warning silenced; catch_warnings swaps process-wide state,
# so threads that decode at once (the bench's PIL thread pool) take turns.
_WARNINGS_LOCK = threading.Lock()


class ImageRejected(ValueError):
    """An image neither decoder turns into pixels; ``reason`` is what the skip and reject counts show."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _named(name: str | None, text: str) -> str:
    return f"{name}: {text}" if name else text


def _as_stream(source: bytes | BinaryIO) -> BinaryIO:
    if isinstance(source, bytes | bytearray | memoryview):
        return io.BytesIO(source)
    try:
        source.seek(0)
    except (AttributeError, OSError):  # pipes and S3 bodies: Image.open would read them whole too
        return io.BytesIO(source.read())
    return source


def open_image(source: bytes | BinaryIO, name: str | None = None) -> Image.Image:
    """The image opened (header only, as ``Image.open``), after the decompression-bomb check.

    ``name`` (a path, or a sample key and shard URL) goes into the warning Pillow gives above
    ``PIL.Image.MAX_IMAGE_PIXELS`` and into the :class:`ImageRejected` above twice that; ``None`` opens
    an image already checked under its name without warning again.
    """
    stream = _as_stream(source)
    prefix = stream.read(16)
    stream.seek(0)
    parser = next((parse for accepts, parse in _HEADER_PARSERS if accepts(prefix)), None)
    if parser is not None:
        image = parser(stream)
    else:
        with _WARNINGS_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                image = Image.open(stream)
            except Image.DecompressionBombError as error:
                raise ImageRejected(SKIP_IMAGE_TOO_LARGE, _named(
                    name, f"{error} Downscale the image, or raise PIL.Image.MAX_IMAGE_PIXELS if it is genuine"
                )) from error
    limit = Image.MAX_IMAGE_PIXELS
    width, height = image.size
    pixels = max(width, 1) * max(height, 1)  # Pillow's count
    if limit is not None and pixels > 2 * limit:
        image.close()
        raise ImageRejected(SKIP_IMAGE_TOO_LARGE, _named(
            name, f"{width}x{height} image ({pixels} pixels) is over twice PIL.Image.MAX_IMAGE_PIXELS "
                  f"({2 * limit}), where Pillow refuses to decode it as a possible decompression bomb; "
                  "downscale it, or raise PIL.Image.MAX_IMAGE_PIXELS if it is genuine"))
    if limit is not None and pixels > limit and name is not None:
        warnings.warn(
            f"{name}: {width}x{height} image ({pixels} pixels) is over PIL.Image.MAX_IMAGE_PIXELS ({limit}), "
            "Pillow's decompression-bomb warning size; decoding it anyway (over twice that it is refused)",
            Image.DecompressionBombWarning, stacklevel=2)
    return image


def check_mode(image: Image.Image, name: str | None = None) -> None:
    """ImageRejected when ``image.mode`` has no 8-bit RGB that both decoders agree on (I, F, ...)."""
    if image.mode not in CONVERTIBLE_MODES:
        kind = MODE_NAMES.get(image.mode, "no 8-bit RGB conversion")
        raise ImageRejected(SKIP_UNSUPPORTED_IMAGE_MODE, _named(
            name, f"image mode {image.mode} ({kind}) has no 8-bit range that Pillow and DALI agree on; "
                  "convert the image to 8-bit RGB (or 8/16-bit grey) before building shards"))


def sixteen_bit_to_eight(values: np.ndarray) -> np.ndarray:
    """round(value * 255 / 65535) in integers: DALI's 16 -> 8 bit scaling (Pillow's clips at 255)."""
    return ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)


def to_rgb(image: Image.Image, name: str | None = None) -> Image.Image:
    """8-bit RGB by the rule above: alpha dropped, 16-bit grey scaled; ImageRejected for other modes."""
    check_mode(image, name)
    if image.mode == "RGB":
        return image
    if image.mode in SIXTEEN_BIT_GREY_MODES:
        grey = sixteen_bit_to_eight(np.asarray(image))
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=2))
    if image.mode == "P" and isinstance(image.info.get("transparency"), bytes):
        # Pillow warns when such a palette goes straight to RGB; through RGBA gives the same colours quietly.
        return image.convert("RGBA").convert("RGB")
    return image.convert("RGB")


def has_transparency(image: Image.Image) -> bool:
    """An alpha channel or a transparent palette entry/colour (PNG tRNS)."""
    return image.mode in ("LA", "PA", "RGBA") or "transparency" in image.info


def sample_image_name(sample: dict, image_key: str) -> str:
    """How warnings and skip messages name a shard image: member, sample key and shard URL."""
    return f"{image_key} of sample {str(sample.get('__key__', ''))!r} from {sample.get('__url__')!r}"
