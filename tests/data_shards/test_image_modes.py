"""Probe matrix: every image mode Pillow and DALI open, through the shard builder and both decoders.

Each case states its outcome in full: the 8-bit RGB both read paths must give (an array made here with
numpy) and how many grey levels each may be off, or the reason both skip it; and what the builder does
(stores the bytes as they are, re-encodes them to JPEG holding the given pixels, or rejects the record with
a counted reason). The README's image-mode table under ``build`` quotes these outcomes. Images are 16x16,
so the read paths' deterministic resize to 16x16 leaves the decoded pixels as they are.

Run: ``.venv/bin/python -m pytest -q tests/data_shards/test_image_modes.py`` (the GPU case skips without CUDA).
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

from data_shards import build
from data_shards.adapters import SourceRecord
from data_shards.boxes import TransformConfig
from data_shards.dali_index import write_index
from data_shards.dali_pipeline import DaliDecoder, dali_available, local_webdataset_loader
from data_shards.loader import StreamingLoader
from data_shards.shard_samples import SampleOptions, SampleRejected, build_members
from data_shards.transforms import PilTransform

SIZE = 16
GREY_LEVELS = TransformConfig(image_size=SIZE, train=False, mean=(0.0, 0.0, 0.0), std=(1 / 255,) * 3)
needs_dali = pytest.mark.skipif(not dali_available()[0], reason="nvidia.dali does not import")

# Pixel values of the cases: a ramp through all 256 levels and two colour channels built from it.
RAMP = np.arange(256, dtype=np.uint8).reshape(SIZE, SIZE)
RGB = np.stack([RAMP, RAMP.T, 255 - RAMP], axis=-1)
ALPHA = (RAMP.T // 2 + 128).astype(np.uint8)  # never 0: lossless WebP may rewrite fully transparent colours
# Flat 8x8 blocks survive JPEG (4:4:4) within a level, so JPEG cases can pin pixels too.
BLOCKS = np.kron(np.array([[30, 90], [150, 210]], np.uint8), np.ones((8, 8), np.uint8))
BLOCK_COLOURS = np.kron(np.array([[[220, 30, 30], [30, 160, 50]], [[30, 70, 220], [235, 210, 20]]], np.uint8),
                        np.ones((8, 8, 1), np.uint8))
PALETTE = [(220, 30, 30), (30, 160, 50), (30, 70, 220), (235, 210, 20)]
INDICES = (RAMP % 4).astype(np.uint8)
# 16-bit values whose 8-bit rounding is not the high byte (odd offsets around each 257 step).
SIXTEEN = np.clip(RAMP.astype(np.int64) * 257 + (RAMP.astype(np.int64) * 37) % 257 - 128, 0, 65535)
CMYK = np.stack([BLOCKS, 255 - BLOCKS, BLOCKS // 2, np.full_like(BLOCKS, 40)], axis=-1)

# Reasons, as the manifest and the loaders' skip counts spell them.
TOO_LARGE = "image too large"
UNSUPPORTED_MODE = "unsupported image mode"
NOT_FOR_DALI = "image format DALI does not decode"


def grey(values: np.ndarray) -> np.ndarray:
    return np.repeat(values[..., None], 3, axis=2).astype(np.uint8)


def on_white(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Alpha compositing over opaque white, rounded."""
    alpha = alpha[..., None].astype(np.float64) / 255
    return np.rint(colour * alpha + 255 * (1 - alpha)).astype(np.uint8)


def saved(image: Image.Image, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def raw_png(array: np.ndarray, bit_depth: int, colour_type: int, width: int | None = None,
            height: int | None = None) -> bytes:
    """A PNG written by hand: Pillow cannot write 16-bit RGB or low bit depths. ``width``/``height``
    override the header alone (a huge image whose pixels are never stored)."""
    rows = array.shape[0]
    if bit_depth == 16:
        packed = array.astype(">u2").reshape(rows, -1).view(np.uint8)
    elif bit_depth < 8:
        per_byte = 8 // bit_depth
        values = array.astype(np.uint8).reshape(rows, -1, per_byte)
        packed = np.zeros(values.shape[:2], np.uint8)
        for position in range(per_byte):
            packed |= values[..., position] << (8 - bit_depth * (position + 1))
    else:
        packed = array.astype(np.uint8).reshape(rows, -1)
    scanlines = b"".join(b"\0" + row.tobytes() for row in packed)
    header = struct.pack(">IIBBBBB", width or array.shape[1], height or rows, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(scanlines))
            + png_chunk(b"IEND", b""))


def palette_image(transparency=None) -> bytes:
    image = Image.new("P", (SIZE, SIZE))
    image.putpalette([value for colour in PALETTE for value in colour])
    image.putdata(INDICES.ravel().tolist())
    options = {} if transparency is None else {"transparency": transparency}
    return saved(image, "PNG", **options)


def exif_rotated_jpeg() -> bytes:
    pixels = np.zeros((SIZE, SIZE, 3), np.uint8)
    pixels[:, : SIZE // 2] = (220, 30, 30)
    pixels[:, SIZE // 2:] = (30, 70, 220)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    return saved(Image.fromarray(pixels), "JPEG", quality=95, subsampling=0, exif=exif.tobytes())


@dataclass(frozen=True)
class Case:
    """One probe. ``pixels``: the 8-bit RGB both read paths give (None: both skip it with ``skip``);
    ``pil_levels``/``dali_levels``: the most either may be off, in grey levels. ``builder``: "kept" (the
    bytes stored as they are, under ``extension``), "png" (re-encoded losslessly, holding exactly
    ``stored``), "jpeg" (re-encoded at quality 95 with 4:2:0 chroma, which smears colour edges: each
    channel's mean within 1 level of ``stored``'s and the mean difference under ``stored_levels``) or the
    reason the record is rejected with."""

    source: bytes
    extension: str
    pixels: np.ndarray | None
    pil_levels: int
    dali_levels: int
    builder: str
    stored: np.ndarray | None = None
    stored_levels: int = 0
    skip: str = ""
    dali_skip: str = ""  # only the DALI path skips it (a format DALI does not decode)


PALETTE_PIXELS = np.array(PALETTE, np.uint8)[INDICES]
PALETTE_ON_WHITE = np.where((INDICES == 0)[..., None], np.uint8(255), PALETTE_PIXELS)
TRANSLUCENT_PALETTE = np.array([0, 128, 255, 255])[INDICES]
SIXTEEN_TO_EIGHT = np.rint(SIXTEEN * 255 / 65535).astype(np.uint8)
HIGH_BYTES = np.dstack([SIXTEEN >> 8, SIXTEEN.T >> 8, (65535 - SIXTEEN) >> 8]).astype(np.uint8)
CMYK_TO_RGB = np.rint((255 - CMYK[..., :3].astype(np.float64)) * (255 - CMYK[..., 3:]) / 255).astype(np.uint8)
STORED_ORIENTATION = np.concatenate([np.tile([[[220, 30, 30]]], (SIZE, SIZE // 2, 1)),
                                     np.tile([[[30, 70, 220]]], (SIZE, SIZE // 2, 1))], axis=1).astype(np.uint8)

CASES = {
    "1: 1-bit PNG": Case(saved(Image.fromarray(RAMP % 3 == 0), "PNG"), "png", grey((RAMP % 3 == 0) * 255),
                         0, 0, "kept"),
    "L: 8-bit grey PNG": Case(saved(Image.fromarray(RAMP), "PNG"), "png", grey(RAMP), 0, 0, "kept"),
    "L: 4-bit grey PNG": Case(raw_png(RAMP % 16, 4, 0), "png", grey(RAMP % 16 * 17), 0, 0, "kept"),
    "L: grey JPEG": Case(saved(Image.fromarray(BLOCKS), "JPEG", quality=95), "jpg", grey(BLOCKS), 1, 1, "kept"),
    "LA: grey and alpha PNG": Case(saved(Image.fromarray(np.stack([RAMP, ALPHA], -1), "LA"), "PNG"), "png",
                                   grey(RAMP), 0, 0, "png", on_white(grey(RAMP), ALPHA)),
    "P: palette PNG": Case(palette_image(), "png", PALETTE_PIXELS, 0, 0, "kept"),
    "P: palette PNG, index 0 transparent": Case(palette_image(transparency=0), "png", PALETTE_PIXELS, 0, 0,
                                                "png", PALETTE_ON_WHITE),
    "P: palette PNG, alpha per entry": Case(palette_image(transparency=bytes([0, 128, 255, 255])), "png",
                                            PALETTE_PIXELS, 0, 0, "png",
                                            on_white(PALETTE_PIXELS, TRANSLUCENT_PALETTE)),
    "RGB: PNG": Case(saved(Image.fromarray(RGB), "PNG"), "png", RGB, 0, 0, "kept"),
    "RGB: JPEG": Case(saved(Image.fromarray(BLOCK_COLOURS), "JPEG", quality=95, subsampling=0), "jpg",
                      BLOCK_COLOURS, 1, 1, "kept"),
    "RGBA: PNG": Case(saved(Image.fromarray(np.dstack([RGB, ALPHA])), "PNG"), "png", RGB, 0, 0, "png",
                      on_white(RGB, ALPHA)),
    "RGBA: lossless WebP": Case(saved(Image.fromarray(np.dstack([RGB, ALPHA])), "WEBP", lossless=True), "webp",
                                RGB, 0, 0, "png", on_white(RGB, ALPHA)),
    # DALI truncates (255 - C)(255 - K) / 255 where Pillow rounds.
    "CMYK: JPEG": Case(saved(Image.fromarray(CMYK, "CMYK"), "JPEG", quality=95), "jpg", CMYK_TO_RGB, 1, 1,
                       "jpeg", CMYK_TO_RGB, 5),  # measured: channel means within 0.24, mean difference 4.8
    "I;16: 16-bit grey PNG": Case(raw_png(SIXTEEN, 16, 0), "png", grey(SIXTEEN_TO_EIGHT), 0, 0, "png",
                                  grey(SIXTEEN_TO_EIGHT)),
    "I;16: 16-bit grey TIFF": Case(saved(Image.fromarray(SIXTEEN.astype(np.uint16)), "TIFF"), "png",
                                   grey(SIXTEEN_TO_EIGHT), 0, 0, "png", grey(SIXTEEN_TO_EIGHT)),
    # Pillow keeps the high byte of 16-bit colour where DALI rounds: at most 1 level apart.
    "RGB: 16-bit PNG": Case(raw_png(np.dstack([SIXTEEN, SIXTEEN.T, 65535 - SIXTEEN]), 16, 2), "png",
                            np.dstack([SIXTEEN_TO_EIGHT, SIXTEEN_TO_EIGHT.T, 255 - SIXTEEN_TO_EIGHT]), 1, 0,
                            "png", HIGH_BYTES),
    "I: 32-bit integer TIFF": Case(saved(Image.fromarray(SIXTEEN.astype(np.int32)), "TIFF"), "png", None, 0, 0,
                                   UNSUPPORTED_MODE, skip=UNSUPPORTED_MODE),
    "F: 32-bit float TIFF": Case(saved(Image.fromarray(RAMP.astype(np.float32) / 255), "TIFF"), "png", None, 0,
                                 0, UNSUPPORTED_MODE, skip=UNSUPPORTED_MODE),
    # Boxes refer to the stored pixels: neither decoder turns the image as the tag asks.
    "EXIF orientation 6: JPEG": Case(exif_rotated_jpeg(), "jpg", STORED_ORIENTATION, 1, 1, "kept"),
    "P: GIF": Case(saved(Image.fromarray(PALETTE_PIXELS).quantize(4), "GIF"), "png", PALETTE_PIXELS, 0, 0,
                   "png", PALETTE_PIXELS, dali_skip=NOT_FOR_DALI),
    "20000x20000 PNG header": Case(raw_png(RGB[:1, :1], 8, 2, width=20000, height=20000), "png", None, 0, 0,
                                   TOO_LARGE, skip=TOO_LARGE),
}


def sample_of(name: str, case: Case) -> dict:
    return {"__key__": name, "__url__": "probe.tar", case.extension: case.source, "txt": "a probe", "json": {}}


def off_by(decoded: np.ndarray, expected: np.ndarray) -> int:
    return int(np.abs(decoded.astype(np.int64) - expected.astype(np.int64)).max())


def pil_pixels(sample: dict) -> np.ndarray:
    image = PilTransform(GREY_LEVELS)(sample)["image"]
    return image.permute(1, 2, 0).round().numpy().astype(np.int64)


@pytest.mark.parametrize("name", list(CASES))
def test_pil_path(name):
    case = CASES[name]
    if case.skip:
        with pytest.raises(ValueError) as error:
            pil_pixels(sample_of(name, case))
        assert getattr(error.value, "reason", None) == case.skip
        assert f"png of sample {name!r} from 'probe.tar'" in str(error.value)
        return
    decoded = pil_pixels(sample_of(name, case))
    assert decoded.shape == case.pixels.shape
    assert off_by(decoded, case.pixels) <= case.pil_levels


@pytest.fixture(scope="module")
def dali_decoder():
    return DaliDecoder(GREY_LEVELS, 2, device="cpu")


@needs_dali
@pytest.mark.parametrize("name", list(CASES))
def test_dali_path_and_agreement_with_pil(name, dali_decoder):
    case = CASES[name]
    before = dict(dali_decoder.skipped)
    batch = dali_decoder.decode([sample_of(name, case)])
    skipped = {reason: count - before.get(reason, 0) for reason, count in dali_decoder.skipped.items()
               if count != before.get(reason, 0)}
    if case.skip or case.dali_skip:
        assert batch["__key__"] == [] and skipped == {case.skip or case.dali_skip: 1}
        return
    assert batch["__key__"] == [name] and skipped == {}
    decoded = batch["image"][0].permute(1, 2, 0).numpy()
    assert off_by(np.rint(decoded), case.pixels) <= case.dali_levels
    # The project's pinned DALI-vs-PIL tolerance (tests/data_shards/test_dali_pipeline.py): under 1.5 levels.
    assert np.abs(decoded - pil_pixels(sample_of(name, case))).max() < 1.5


def built(tmp_path, name: str, case: Case):
    path = tmp_path / f"source.{case.extension}"
    path.write_bytes(case.source)
    record = SourceRecord(origin="probe.json#0", image_paths=[str(path)], text="a probe", meta={})
    members, _, _ = build_members("000000000", record, SampleOptions(None, 95, "albef"))
    return dict(members)


@pytest.mark.parametrize("name", list(CASES))
def test_builder(tmp_path, name):
    case = CASES[name]
    if case.builder not in ("kept", "png", "jpeg"):
        with pytest.raises(SampleRejected) as rejected:
            built(tmp_path, name, case)
        assert rejected.value.reason == case.builder
        assert rejected.value.detail.startswith(f"{tmp_path}/source.{case.extension} (record probe.json#0): ")
        return
    members = built(tmp_path, name, case)
    meta = json.loads(members["json"])
    assert (meta["width"], meta["height"]) == (SIZE, SIZE)
    if case.builder == "kept":
        assert members[case.extension] == case.source
        return
    extension, image_format = {"png": ("png", "PNG"), "jpeg": ("jpg", "JPEG")}[case.builder]
    assert sorted(members) == sorted([extension, "json", "txt"])
    with Image.open(io.BytesIO(members[extension])) as image:
        assert (image.format, image.mode) == (image_format, "RGB")
        pixels = np.asarray(image).astype(np.float64)
    if case.builder == "png":
        assert off_by(pixels, case.stored) == 0
    else:
        assert np.abs(pixels.mean(axis=(0, 1)) - case.stored.mean(axis=(0, 1))).max() <= 1
        assert np.abs(pixels - case.stored).mean() < case.stored_levels


def test_builder_records_the_ignored_exif_orientation(tmp_path):
    members = built(tmp_path, "exif", CASES["EXIF orientation 6: JPEG"])
    assert json.loads(members["json"])["exif_orientation"] == 6
    assert "exif_orientation" not in json.loads(built(tmp_path, "plain", CASES["RGB: JPEG"])["json"])


def test_build_counts_each_reject_reason(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    records = []
    for index, (name, case) in enumerate(CASES.items()):
        (images / f"{index}.{case.extension}").write_bytes(case.source)
        records.append({"image": f"{index}.{case.extension}", "caption": name})
    annotations = tmp_path / "probe.json"
    annotations.write_text(json.dumps(records))
    out = tmp_path / "out"
    status = build.main(["--input", str(annotations), "--format", "albef", "--image-root", str(images),
                         "--output", f"{out}/probe-%06d.tar", "--samples-per-shard", "100",
                         "--max-reject-fraction", "0.5"])
    capsys.readouterr()
    assert status == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rejects"] == {UNSUPPORTED_MODE: 2, TOO_LARGE: 1}
    assert manifest["written"] == len(CASES) - 3
    huge = [example for example in manifest["inputs"][0]["reject_examples"] if example["reason"] == TOO_LARGE]
    assert huge[0]["detail"].startswith(f"{images}/20.png (record probe.json#20): 20000x20000 image (400000000 "
                                        "pixels) is over twice PIL.Image.MAX_IMAGE_PIXELS")


def write_probe_shard(path) -> str:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as archive:
        for index, (name, case) in enumerate(CASES.items()):
            for extension, data in ((case.extension, case.source), ("txt", name.encode()), ("json", b"{}")):
                info = tarfile.TarInfo(f"{index:04d}.{extension}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    write_index(str(path))
    return str(path)


def test_loaders_skip_and_count_by_reason(tmp_path):
    """A shard built elsewhere holding every case: each loader skips what its decoder refuses, by reason."""
    shard = write_probe_shard(tmp_path / "probe.tar")
    pil = StreamingLoader(shard, GREY_LEVELS, batch_size=64, num_workers=0, shuffle_buffer=0, decoder="pil",
                          drop_last=False)
    texts = [text for batch in pil for text in batch["text"]]
    assert pil.skipped == {UNSUPPORTED_MODE: 2, TOO_LARGE: 1}
    assert sorted(texts) == sorted(name for name, case in CASES.items() if not case.skip)
    if not dali_available()[0]:
        return
    dali = local_webdataset_loader([shard], None, GREY_LEVELS, 64, device="cpu")
    texts = [text for batch in dali for text in batch["text"]]
    assert dali.skipped == {UNSUPPORTED_MODE: 2, TOO_LARGE: 1, NOT_FOR_DALI: 1}
    assert sorted(texts) == sorted(name for name, case in CASES.items() if not (case.skip or case.dali_skip))


def test_large_image_warnings_name_the_image(tmp_path, monkeypatch):
    """Over PIL.Image.MAX_IMAGE_PIXELS (lowered here to 200 so a 16x16 image crosses it) an image is
    decoded with a warning naming it; Pillow's own warning, which names nothing, does not appear."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200)
    case = CASES["RGB: PNG"]
    expected = "16x16 image (256 pixels) is over PIL.Image.MAX_IMAGE_PIXELS (200)"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        members = built(tmp_path, "large", case)
        decoded = pil_pixels(sample_of("large", case))
        if dali_available()[0]:
            batch = DaliDecoder(GREY_LEVELS, 1, device="cpu").decode([sample_of("large", case)])
            assert batch["__key__"] == ["large"]
    messages = [str(warning.message) for warning in caught
                if issubclass(warning.category, Image.DecompressionBombWarning)]
    names = [f"{tmp_path}/source.png (record probe.json#0)", "png of sample 'large' from 'probe.tar'"]
    names += ["png of sample 'large' from 'probe.tar'"] if dali_available()[0] else []
    assert messages == [f"{name}: {expected}, Pillow's decompression-bomb warning size; decoding it anyway "
                        "(over twice that it is refused)" for name in names]
    assert members["png"] == case.source and off_by(decoded, RGB) == 0


@pytest.mark.gpu
@needs_dali
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU for DALI mixed decoding")
def test_gpu_decoding_gives_the_cpu_outcomes():
    names = list(CASES)
    cpu, gpu = DaliDecoder(GREY_LEVELS, 1, device="cpu"), DaliDecoder(GREY_LEVELS, 1, device="gpu")
    for name in names:
        on_cpu, on_gpu = (decoder.decode([sample_of(name, CASES[name])]) for decoder in (cpu, gpu))
        assert on_gpu["__key__"] == on_cpu["__key__"], name
        if on_cpu["__key__"]:  # nvJPEG and libjpeg-turbo round the IDCT differently
            assert (on_gpu["image"].cpu() - on_cpu["image"]).abs().max() < 3, name
    assert gpu.skipped == cpu.skipped
