"""DALI decoding path: encoded samples -> the same augmented, normalised batches as the PIL path.

Plans are drawn in Python as ``transforms.PilTransform`` draws them (same stream and arguments) and
reach DALI per image through ``external_source``; boxes, text and meta follow them in Python.
``DaliDecoder`` decodes streamed samples (``device="gpu"``: nvJPEG, ``mixed``); ``local_webdataset_loader``
reads local shards with DALI's ``readers.webdataset`` and ``.idx`` files. CPU pipelines use
``device_id=None`` and need no GPU. Each plan part against the PIL path (measured in the tests):
  crop + resize  ``decoders.image_slice`` of the crop plus the filter's reach, then cubic antialiased
                 ``resize`` with a sub-pixel ``roi``: within 1 grey level.
  flip           ``crop_mirror_normalize(mirror=)``, or folded into the affine matrix: exact.
  shear, translate, rotate  ``warp_affine`` bilinear, dst -> src: within 2 levels inside; pixels on the
                 edge of the filled area differ (DALI blends the grey fill in, PIL does not).
  brightness     ``fn.brightness`` shifted by half a level: PIL's truncation.
  sharpness      ``filter`` with PIL's SMOOTH kernel, PIL's blend, the 1-pixel border kept.
  autocontrast   per-channel ``reductions.min/max`` and arithmetic.
                 These match PIL on equal input; end to end the resize's +-1 grows to 2 (brightness,
                 sharpness) or up to 5 levels (autocontrast's stretch).
  equalize       ``fn.equalize`` = OpenCV's ``equalizeHist``: a value maps to its bin's inclusive CDF,
                 PIL's (and ALBEF's) to the exclusive one, so a bin holding many pixels (the grey fill
                 after a rotate) lands tens of levels apart. DALI has no histogram op to rebuild PIL's
                 LUT in the pipeline; about 10% of RandAugment(2, 7) images draw equalize.
Images become 8-bit RGB by the rule of ``data_shards.image_modes``, as on the PIL path: before a batch
runs, each image header is checked, and images too large, of a mode without an agreed 8-bit RGB (32-bit
integer, float) or of a format DALI does not decode (GIF, ICO) are dropped and counted by reason. DALI
decodes without EXIF rotation (``adjust_orientation=False``; its default turns the image), so pixels stay
where the boxes say. Photometric ops run in plan order through DALI conditionals, one slot per RandAugment op::

    decoder = DaliDecoder(TransformConfig(), batch_size=64, device="cpu")
    batch = decoder.decode(raw_samples)   # {"__key__", "image" [B,3,H,W] or [B,2,3,H,W], "text", "meta"}

Tests: ``.venv/bin/python -m pytest -q tests/data_shards/test_dali_pipeline.py``.
"""

from __future__ import annotations

import math
import os
from collections import Counter

import numpy as np
import torch

from data_shards import boxes, tar_samples, transforms
from data_shards.boxes import AugmentPlan, TransformConfig
from data_shards.dali_index import index_url_for
from data_shards.image_modes import ImageRejected, check_mode, open_image, sample_image_name

DEVICES = ("cpu", "gpu")
OP_CODES = {"brightness": 1, "sharpness": 2, "autocontrast": 3, "equalize": 4}  # 0: empty slot
DEFAULT_FILL = AugmentPlan.__dataclass_fields__["fill"].default
# Pillow's names of the formats DALI decodes on the CPU (measured; GIF and ICO fail inside DALI).
DALI_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "TIFF", "JPEG2000", "PPM"})
# PIL's ImageFilter.SMOOTH, which ImageEnhance.Sharpness blends against.
SMOOTH_KERNEL = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=np.float32) / 13.0


def dali_available() -> tuple[bool, str]:
    """(True, "") when nvidia.dali imports, else (False, why and how to install it)."""
    try:
        import nvidia.dali  # noqa: F401
    except Exception as error:  # a broken install raises more than ImportError
        return False, f"nvidia.dali does not import ({error}); pip install nvidia-dali-cuda130"
    return True, ""


def check_device(device: str) -> None:
    if device not in DEVICES:
        raise ValueError(f"DALI device must be one of {DEVICES}, got {device!r}")
    if device == "gpu" and not torch.cuda.is_available():
        raise ValueError("DALI device='gpu' needs a CUDA GPU and torch sees none; "
                         "use device='cpu' (DALI CPU decoding) or the PIL decoder")
    usable, reason = dali_available()
    if not usable:
        raise RuntimeError(reason)


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the image header alone, without the decompression-bomb warning (``render``
    gives it, naming the sample); ValueError when it is not a readable image or too large."""
    try:
        with open_image(data) as image:
            return image.size
    except Exception as error:
        raise ValueError(f"cannot read the image header of {len(data)} bytes ({error})") from error


def renderable_size(data: bytes, name: str) -> tuple[int, int]:
    """(width, height) of an image this pipeline renders as the PIL path would; ImageRejected, with the
    reason the skip counts show, for one too large, of a mode without an agreed 8-bit RGB (32-bit integer,
    float) or of a format DALI does not decode; ValueError when the header is unreadable."""
    try:
        image = open_image(data, name)
    except ImageRejected:
        raise
    except Exception as error:
        raise ValueError(f"{name}: cannot read the image header ({error})") from error
    with image:
        check_mode(image, name)
        if image.format not in DALI_FORMATS:
            raise ImageRejected(tar_samples.SKIP_UNSUPPORTED_IMAGE_FORMAT, (
                f"{name}: DALI does not decode {image.format} images; use the PIL decoder for such shards, "
                "or rebuild them (python -m data_shards build re-encodes such images to JPEG)"))
        return image.size


def image_inputs(data: bytes, plan: AugmentPlan, slots: int, size: tuple[int, int]) -> dict[str, np.ndarray]:
    """One image's values for the pipeline's external sources, keyed by source name; ``size`` is the
    image's (width, height)."""
    if len(plan.photometric) > slots:
        raise ValueError(f"plan has {len(plan.photometric)} photometric ops; this decoder renders at most "
                         f"{slots} (TransformConfig.randaugment_ops)")
    if tuple(plan.fill) != DEFAULT_FILL:
        raise ValueError(f"DALI warp_affine takes one fill value, {DEFAULT_FILL}; the plan has {plan.fill}")
    width, height = size
    x0, y0, x1, y1 = plan.crop
    # Decode the crop plus the cubic filter's reach (2 output pixels, in source pixels) where the image
    # has them: PIL's resample reads past the crop box too, so the crop's edge pixels agree.
    margin_x = math.ceil(2 * max(1.0, (x1 - x0) / plan.size[1])) + 1
    margin_y = math.ceil(2 * max(1.0, (y1 - y0) / plan.size[0])) + 1
    left, top = max(math.floor(x0) - margin_x, 0), max(math.floor(y0) - margin_y, 0)
    right, bottom = min(math.ceil(x1) + margin_x, width), min(math.ceil(y1) + margin_y, height)
    matrix = np.array([[1, 0, 0], [0, 1, 0]], dtype=np.float32)
    if plan.affine is not None:
        matrix = np.array(boxes.invert_affine(plan.affine), dtype=np.float32).reshape(2, 3)
        if plan.flip:  # sample the flipped image: x_source -> width - x_source
            matrix[0] = -matrix[0]
            matrix[0, 2] += plan.size[1]
    columns = {
        "encoded": np.frombuffer(data, dtype=np.uint8),
        "anchor": np.array([left, top], np.float32),
        "extent": np.array([right - left, bottom - top], np.float32),
        "roi_start": np.array([y0 - top, x0 - left], np.float32),  # resize takes (y, x)
        "roi_end": np.array([y1 - top, x1 - left], np.float32),
        "matrix": matrix,
        "use_affine": np.array(plan.affine is not None),
        "mirror": np.array(plan.flip and plan.affine is None, np.int32),
    }
    for slot, (name, value) in enumerate([*plan.photometric, *[("", 1.0)] * (slots - len(plan.photometric))]):
        columns[f"op_code_{slot}"] = np.array(OP_CODES[name] if name else 0, np.int32)
        columns[f"op_value_{slot}"] = np.array(value, np.float32)
    return columns


def build_augment_pipeline(config: TransformConfig, max_batch: int, device: str, num_threads: int, seed: int):
    """The DALI graph that renders plans; its external sources are the keys of ``image_inputs``."""
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali import math as dali_math

    size = [config.image_size, config.image_size]
    slots = config.randaugment_ops
    inner = np.zeros((*size, 1), dtype=np.float32)  # PIL's sharpness leaves the outermost pixels alone
    inner[1:-1, 1:-1] = 1.0
    FLOAT = types.FLOAT

    def source(name, dtype, ndim):
        return fn.external_source(name=name, dtype=dtype, ndim=ndim)

    def to_uint8(values):
        return fn.cast(dali_math.clamp(values, 0.0, 255.0), dtype=types.UINT8)

    @pipeline_def(enable_conditionals=True)
    def augment():
        window = source("anchor", FLOAT, 1), source("extent", FLOAT, 1)
        image = fn.decoders.image_slice(
            source("encoded", types.UINT8, 1), *window, device="mixed" if device == "gpu" else "cpu",
            output_type=types.RGB, axis_names="WH", normalized_anchor=False, normalized_shape=False,
            adjust_orientation=False)
        image = fn.resize(image, size=size, interp_type=types.INTERP_CUBIC, antialias=True,
                          roi_start=source("roi_start", FLOAT, 1), roi_end=source("roi_end", FLOAT, 1),
                          roi_relative=False)
        matrix, use_affine = source("matrix", FLOAT, 2), source("use_affine", types.BOOL, 0)
        if use_affine:
            image = fn.warp_affine(image, matrix=matrix, fill_value=float(DEFAULT_FILL[0]),
                                   interp_type=types.INTERP_LINEAR, inverse_map=True)
        for slot in range(slots):
            code, value = source(f"op_code_{slot}", types.INT32, 0), source(f"op_value_{slot}", FLOAT, 0)
            if code == OP_CODES["brightness"]:
                # Shifting by half a level turns the op's rounding into PIL's truncation; 30x faster on
                # the CPU than the same formula in DALI arithmetic.
                image = fn.brightness(image, brightness=value, brightness_shift=-0.5 / 255)
            elif code == OP_CODES["sharpness"]:
                smooth = fn.filter(image, types.Constant(SMOOTH_KERNEL, device="cpu"), border="clamp")
                mask = types.Constant(inner, device=device)
                degenerate = smooth * mask + image * (1.0 - mask)
                value = value.gpu() if device == "gpu" else value
                image = to_uint8(dali_math.floor(degenerate + value * (image - degenerate)))
            elif code == OP_CODES["autocontrast"]:
                low = fn.cast(fn.reductions.min(image, axes=[0, 1]), dtype=types.FLOAT)
                high = fn.cast(fn.reductions.max(image, axes=[0, 1]), dtype=types.FLOAT)
                stretch = fn.cast(high > low, dtype=types.FLOAT)  # a flat channel stays as it is
                numerator = 255.0 * stretch + (1.0 - stretch)
                denominator = dali_math.max(high - low, 1.0) * stretch + (1.0 - stretch)
                image = to_uint8(dali_math.floor((image - low * stretch) * numerator / denominator))
            elif code == OP_CODES["equalize"]:
                image = fn.equalize(image)
        return fn.crop_mirror_normalize(
            image, mirror=source("mirror", types.INT32, 0), dtype=types.FLOAT, output_layout="CHW",
            mean=[255.0 * value for value in config.mean], std=[255.0 * value for value in config.std])

    device_id = torch.cuda.current_device() if device == "gpu" else None
    return augment(batch_size=max_batch, num_threads=num_threads, device_id=device_id, seed=seed,
                   prefetch_queue_depth=1)


class DaliDecoder:
    """Raw streamed samples -> ``{"__key__", "image", "text", "meta"}`` through a DALI pipeline.

    Plans come from the same per-sample generators as ``PilTransform(config, seed)`` at the same epoch
    (``set_epoch``): a sample's ``__view__`` from the reader, else the call count. So the same samples
    get the same plans on both paths. Images neither DALI nor PIL can decode, and images either path
    refuses (see ``renderable_size``), are dropped from the batch and counted in ``skipped`` by reason.
    """

    def __init__(self, config: TransformConfig, batch_size: int, *, device: str = "cpu", num_threads: int = 2,
                 seed: int = 0):
        check_device(device)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.config, self.batch_size, self.device = config, batch_size, device
        self.num_threads, self.seed = num_threads, seed
        self.plan_stream = transforms.PilTransform(config, seed)  # its generators, not its pixels
        self.skipped: Counter = Counter()
        self._pipeline = None

    def set_epoch(self, epoch: int) -> None:
        self.plan_stream.set_epoch(epoch)

    def build(self) -> None:
        """Create the DALI pipeline now (otherwise the first ``decode`` does)."""
        if self._pipeline is None:
            # Room for a full batch of two-image samples in one run.
            self._pipeline = build_augment_pipeline(self.config, 2 * self.batch_size, self.device,
                                                    self.num_threads, self.seed)
            self._pipeline.build()

    def draw_plans(self, samples: list[dict]) -> list[AugmentPlan | tuple[AugmentPlan, ...] | None]:
        """One plan per sample (a pair for two-image samples), drawn as PilTransform draws them; None
        where an image header is unreadable."""
        plans = []
        for sample in samples:
            key = str(sample.get("__key__", ""))
            image_keys = transforms._image_keys(sample)
            text, meta = transforms._as_text(sample.get("txt")), transforms._as_meta(sample.get("json"))
            rng = self.plan_stream._next_random(key, sample.get("__view__"))
            try:
                sizes = [image_size(sample[image_key]) for image_key in image_keys]
            except ValueError:
                plans.append(None)
                continue
            check_text = transforms._flip_check_text(text, meta)
            if len(sizes) == 2:
                plans.append(tuple(boxes.plan_augment(rng, *size, self.config, text=check_text)
                                   for size in sizes))
                continue
            keep_box = None
            if self.config.region_crop and self.config.train:
                keep_box = transforms._region_to_keep(rng, meta, *sizes[0])
            plans.append(boxes.plan_augment(rng, *sizes[0], self.config, keep_box=keep_box, text=check_text))
        return plans

    def decode(self, samples: list[dict]) -> dict:
        return self.render(samples, self.draw_plans(samples))

    def render(self, samples: list[dict], plans: list) -> dict:
        """Render the given plans (one per sample, a tuple for a two-image sample) into a batch."""
        if not samples or len(plans) != len(samples):
            raise ValueError(f"DaliDecoder needs one plan per sample, got {len(samples)} samples and "
                             f"{len(plans)} plans")
        kept = []
        for sample, plan in zip(samples, plans, strict=True):
            image_keys = transforms._image_keys(sample)
            try:
                sizes = [renderable_size(sample[image_key], sample_image_name(sample, image_key))
                         for image_key in image_keys]
            except ImageRejected as rejected:
                self.skipped[rejected.reason] += 1
                continue
            except ValueError:
                sizes = None
            if sizes is None or plan is None:
                self.skipped[tar_samples.SKIP_UNDECODABLE_IMAGE] += 1
            else:
                kept.append((sample, (plan,) if isinstance(plan, AugmentPlan) else tuple(plan), sizes))
        if len({len(image_plans) for _, image_plans, _ in kept}) > 1:
            raise ValueError("a batch mixes one-image and two-image samples; do not mix them in a batch")
        try:
            pixels = self._run(kept)
        except RuntimeError as error:
            kept = self._drop_undecodable(kept, error)
            pixels = self._run(kept)
        if kept and len(kept[0][1]) == 2:
            pixels = pixels.view(len(kept), 2, *pixels.shape[1:])
        batch = {"__key__": [], "image": pixels, "text": [], "meta": []}
        for sample, image_plans, _ in kept:
            text, meta = transforms._as_text(sample.get("txt")), dict(transforms._as_meta(sample.get("json")))
            if len(image_plans) == 1:  # two-image statements talk about the pair and stay as they are
                text, meta = (boxes.transform_text(text, image_plans[0], self.config),
                              boxes.transform_meta(meta, image_plans[0], self.config, caption=text))
            batch["__key__"].append(str(sample.get("__key__", "")))
            batch["text"].append(text)
            batch["meta"].append(meta)
        return batch

    def _run(self, kept: list[tuple[dict, tuple, list]]) -> torch.Tensor:
        columns = []
        for sample, image_plans, sizes in kept:
            for image_key, plan, size in zip(transforms._image_keys(sample), image_plans, sizes, strict=True):
                if tuple(plan.size) != (self.config.image_size,) * 2:
                    raise ValueError(f"plan size {plan.size} is not image_size {self.config.image_size}")
                columns.append(image_inputs(sample[image_key], plan, self.config.randaugment_ops, size))
        from nvidia.dali.plugin.pytorch import feed_ndarray

        target = "cuda" if self.device == "gpu" else "cpu"
        stream = torch.cuda.current_stream() if target == "cuda" else None
        chunks = [torch.empty((0, 3, self.config.image_size, self.config.image_size), device=target)]
        self.build()
        for start in range(0, len(columns), 2 * self.batch_size):
            part = columns[start:start + 2 * self.batch_size]
            for name in part[0]:
                self._pipeline.feed_input(name, [item[name] for item in part])
            dense = self._pipeline.run()[0].as_tensor()  # DALI reuses its buffers: copy out
            chunks.append(torch.empty(dense.shape(), dtype=torch.float32, device=target))
            feed_ndarray(dense, chunks[-1], cuda_stream=stream)
        return chunks[-1] if len(chunks) <= 2 else torch.cat(chunks)

    def _drop_undecodable(self, kept: list, error: RuntimeError) -> list:
        """A failed run leaves the pipeline unusable: rebuild it, and drop the samples whose images PIL
        cannot decode either; when PIL decodes them all, the failure is DALI's own and is raised."""
        self._pipeline = None
        readable = []
        for entry in kept:
            sample = entry[0]
            try:
                for image_key in transforms._image_keys(sample):
                    transforms.decode_image(sample[image_key])
                readable.append(entry)
            except ValueError:
                self.skipped[tar_samples.SKIP_UNDECODABLE_IMAGE] += 1
        if len(readable) < len(kept):
            return readable
        raise RuntimeError(f"DALI failed on a batch whose images all decode with PIL: {error}") from error


# Reader output slots: one image, the two images of a pair, then caption and meta.
IMAGE_SLOTS = ("jpg;jpeg;png;webp", "0.jpg;0.jpeg;0.png;0.webp", "1.jpg;1.jpeg;1.png;1.webp")


def build_reader_pipeline(loader: LocalWebDatasetLoader, seed: int):
    """DALI's webdataset reader (CPU): image slots, txt and json bytes, and each image's source info."""
    from nvidia.dali import fn, pipeline_def

    @pipeline_def
    def read():
        components = fn.readers.webdataset(
            paths=loader.shard_paths, index_paths=loader.index_paths, ext=[*IMAGE_SLOTS, "txt", "json"],
            missing_component_behavior="empty", case_sensitive_extensions=False, shard_id=loader.shard_id,
            num_shards=loader.num_shards, random_shuffle=loader.random_shuffle, seed=seed,
            pad_last_batch=True, name="Reader")
        sources = [fn.get_property(components[slot], key="source_info") for slot in range(len(IMAGE_SLOTS))]
        return (*components, *sources)

    return read(batch_size=loader.batch_size, num_threads=1, device_id=None, seed=seed)


class LocalWebDatasetLoader:
    """Batches from local shards read by DALI's ``readers.webdataset`` with their index files (None:
    ``NAME.idx`` beside ``NAME.tar``), reader shard ``shard_id`` of ``num_shards`` (one per rank); each
    ``iter()`` is one pass over that share, ``skipped`` counts dropped samples by reason.

    The reader runs in its own CPU pipeline and hands the encoded samples to Python, which draws each plan
    from the sample's real image size, text and regions; ``DaliDecoder`` then renders them. Plans drawn in
    DALI (``fn.random``) could not reproduce ``plan_augment`` (region crops, careful flips, PIL's stream),
    and a separate plan ``external_source`` cannot know which sample a shuffling reader emits next; this
    way plan and sample cannot drift apart."""

    def __init__(self, shard_paths: list[str], index_paths: list[str] | None, config: TransformConfig,
                 batch_size: int, *, device: str = "cpu", shard_id: int = 0, num_shards: int = 1,
                 seed: int = 0, random_shuffle: bool = False, num_threads: int = 2):
        self.shard_paths = list(shard_paths)
        self.index_paths = [index_url_for(path) for path in self.shard_paths] if index_paths is None \
            else list(index_paths)
        if not self.shard_paths or len(self.index_paths) != len(self.shard_paths):
            raise ValueError(f"need one index file per shard, got {len(self.shard_paths)} shards and "
                             f"{len(self.index_paths)} index files")
        if not 0 <= shard_id < num_shards:
            raise ValueError(f"shard_id must be in [0, {num_shards}), got {shard_id}")
        self.batch_size, self.shard_id, self.num_shards = batch_size, shard_id, num_shards
        self.seed, self.random_shuffle = seed, random_shuffle
        self.epoch = 0
        self.decoder = DaliDecoder(config, batch_size, device=device, num_threads=num_threads, seed=seed)
        self.skipped: Counter = Counter()

    def __iter__(self):
        for kind, paths in (("shard", self.shard_paths), ("index", self.index_paths)):
            for path in paths:
                if not os.path.isfile(path):
                    advice = "check the path" if kind == "shard" else "write it: wds2idx SHARD.tar SHARD.idx"
                    raise FileNotFoundError(f"{kind} file {path} does not exist; {advice}")
        reader = build_reader_pipeline(self, self.seed + self.epoch)
        reader.build()
        total = reader.reader_meta("Reader")["epoch_size"]
        # DALI gives reader shard i the samples [N*i//S, N*(i+1)//S) and pads its last batch.
        remaining = total * (self.shard_id + 1) // self.num_shards - total * self.shard_id // self.num_shards
        self.decoder.set_epoch(self.epoch)
        while remaining > 0:
            outputs = reader.run()
            rows = min(remaining, self.batch_size)
            remaining -= rows
            samples = [sample for sample in (self._sample(outputs, row) for row in range(rows)) if sample]
            if samples:
                before = Counter(self.decoder.skipped)
                batch = self.decoder.decode(samples)
                self.skipped.update(self.decoder.skipped - before)
                if batch["__key__"]:
                    yield batch
        self.epoch += 1

    def _sample(self, outputs, row: int) -> dict | None:
        """A raw sample as ShardReader yields it (``__index__`` -1: DALI does not say), or None when it
        cannot be used, counted by the reader's reasons."""
        slots, raw, url = len(IMAGE_SLOTS), {}, ""
        for slot, extension in enumerate((None,) * slots + ("txt", "json")):
            data = np.array(outputs[slot][row]).tobytes()
            if not data:  # a missing component reads as empty
                continue
            if extension is None:
                source_info = np.array(outputs[slots + 2 + slot][row]).tobytes().decode()
                location, _, name = source_info.rpartition(":")  # "shard.tar:OFFSET:key.jpg"
                url = location.rpartition(":")[0]
                raw["__key__"], extension = tar_samples.split_member_name(name)
            raw[extension] = data
        return tar_samples._finish(raw, url, -1, self.skipped)


local_webdataset_loader = LocalWebDatasetLoader  # the name callers use; one pass per iter()
