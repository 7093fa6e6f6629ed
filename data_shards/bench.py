"""``python -m data_shards bench URLS``: images/s of reading, decoding and augmenting the same shards.

    python -m data_shards bench '/tmp/w/shards/train-{000000..000003}.tar' --decoder dali --batch-size 64 \\
        [--device cpu|gpu] [--threads 2] [--image-size 256] [--max-samples N] [--repeat R] [--json]

Four stages, each timed on its own over the same shards in one process (``--max-samples`` caps the
images of each; ``--repeat R`` runs each R times and keeps the fastest, for shared machines):
  raw_tar_read  the reference: plain ``tarfile`` streaming of the shard files, every member's bytes read,
                no grouping.
  read          ``ShardReader`` (grouping by key, txt/json decoding), no shuffle.
  decode        read + decode + deterministic resize (``TransformConfig(train=False)``) + batching.
  augment       read + decode + the full training plan (crop, flip, RandAugment) + batching.
Decoding uses ``--decoder``: ``dali`` (``DaliDecoder``; ``--device gpu`` decodes with nvJPEG, ``mixed``,
the default when CUDA is available) or ``pil`` (``PilTransform`` + ``collate``; ``--threads`` > 1 maps
it over a thread pool). A DALI pipeline is built and run on one batch before its stage is timed.
Two-image samples count two images. ``--json`` prints one object: decoder, batch_size, images,
raw_tar_read, read, decode, augment (images/s), ratios, device, threads, image_size, repeat, cpu.
Progress goes to stderr when it is a terminal.

Tests: ``.venv/bin/python -m pytest -q tests/data_shards/test_bench.py``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from tqdm import tqdm

from data_shards import storage
from data_shards.boxes import TransformConfig
from data_shards.reader import ShardReader
from data_shards.tar_samples import is_image_extension, split_member_name
from data_shards.transforms import PilTransform, collate


@dataclass(frozen=True)
class BenchSettings:
    urls: str
    decoder: str
    batch_size: int
    device: str
    threads: int
    image_size: int
    max_samples: int | None
    repeat: int = 1


@dataclass(frozen=True)
class StageResult:
    images: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def progress(stage: str, total: int | None) -> tqdm:
    # disable=None: shown on a terminal only, so --json output piped elsewhere stays clean.
    return tqdm(total=total, desc=stage, unit=" img", file=sys.stderr, disable=None, mininterval=0.5)


def count_images(sample: dict) -> int:
    return sum(1 for key in sample if not key.startswith("__") and is_image_extension(key))


def raw_tar_read(settings: BenchSettings) -> StageResult:
    """The reference speed: stream every member of every shard with plain tarfile, no grouping."""
    images = 0
    start = time.perf_counter()
    with progress("raw tar read", settings.max_samples) as bar:
        for url in storage.expand_urls(settings.urls):
            with storage.open_read(url) as stream, tarfile.open(fileobj=stream, mode="r|") as archive:
                for member in archive:
                    handle = archive.extractfile(member) if member.isfile() else None
                    if handle is None:
                        continue
                    handle.read()
                    if is_image_extension(split_member_name(member.name)[1]):
                        images += 1
                        bar.update()
                        if settings.max_samples is not None and images >= settings.max_samples:
                            return StageResult(images, time.perf_counter() - start)
    return StageResult(images, time.perf_counter() - start)


def samples_until_limit(settings: BenchSettings, bar: tqdm | None = None) -> Iterator[dict]:
    """Our reader's samples in shard order, stopping once ``max_samples`` images have been read."""
    images = 0
    for sample in ShardReader(settings.urls, rank=0, world_size=1, shard_shuffle=False):
        if settings.max_samples is not None and images >= settings.max_samples:
            return
        images += count_images(sample)
        if bar is not None:
            bar.update(count_images(sample))
        yield sample


def read_only(settings: BenchSettings) -> StageResult:
    images = 0
    start = time.perf_counter()
    with progress("read", settings.max_samples) as bar:
        for sample in samples_until_limit(settings, bar):
            images += count_images(sample)
    return StageResult(images, time.perf_counter() - start)


def make_batcher(settings: BenchSettings, config: TransformConfig) -> Callable[[list[dict]], dict]:
    """samples -> batch with the chosen decoder; PIL skips undecodable samples as the loader does."""
    if settings.decoder == "dali":
        from data_shards.dali_pipeline import DaliDecoder

        decoder = DaliDecoder(config, settings.batch_size, device=settings.device,
                              num_threads=settings.threads, seed=0)
        return decoder.decode
    transform = PilTransform(config, seed=0)
    pool = ThreadPoolExecutor(settings.threads) if settings.threads > 1 else None

    def transform_or_none(sample: dict) -> dict | None:
        try:
            return transform(sample)
        except ValueError:
            return None

    def pil_batch(samples: list[dict]) -> dict:
        done = pool.map(transform_or_none, samples) if pool is not None else map(transform_or_none, samples)
        return collate([item for item in done if item is not None])

    return pil_batch


def batch_images(batch: dict) -> int:
    image = batch["image"]
    return image.shape[0] * (image.shape[1] if image.dim() == 5 else 1)


def decode_stage(settings: BenchSettings, stage: str, train: bool) -> StageResult:
    config = TransformConfig(image_size=settings.image_size, train=train)
    batcher = make_batcher(settings, config)
    warm_up = list(itertools.islice(samples_until_limit(settings), settings.batch_size))
    batcher(warm_up)  # builds the DALI pipeline and its buffers outside the clock
    synchronize = torch.cuda.synchronize if settings.device == "gpu" else (lambda: None)
    synchronize()
    images = 0
    pending: list[dict] = []
    start = time.perf_counter()
    with progress(stage, settings.max_samples) as bar:
        for sample in samples_until_limit(settings):
            pending.append(sample)
            if len(pending) == settings.batch_size:
                images += batch_images(batcher(pending))
                bar.update(images - bar.n)
                pending = []
        if pending:
            images += batch_images(batcher(pending))
        synchronize()
    return StageResult(images, time.perf_counter() - start)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def ratio(result: StageResult, reference: StageResult) -> float:
    if not reference.images_per_second:
        return 0.0
    return round(result.images_per_second / reference.images_per_second, 4)


def fastest(settings: BenchSettings, stage: Callable[[], StageResult]) -> StageResult:
    return max((stage() for _ in range(settings.repeat)), key=lambda result: result.images_per_second)


def run_bench(settings: BenchSettings) -> dict:
    raw = fastest(settings, lambda: raw_tar_read(settings))
    read = fastest(settings, lambda: read_only(settings))
    decode = fastest(settings, lambda: decode_stage(settings, "decode", train=False))
    augment = fastest(settings, lambda: decode_stage(settings, "augment", train=True))
    stages = {"raw_tar_read": raw, "read": read, "decode": decode, "augment": augment}
    rates = {name: result.images_per_second for name, result in stages.items()}
    on_gpu = settings.decoder == "dali" and settings.device == "gpu"
    return {
        "decoder": settings.decoder,
        "batch_size": settings.batch_size,
        "images": read.images,
        **rates,
        "ratios": {"read_vs_raw": ratio(read, raw), "decode_vs_read": ratio(decode, read),
                   "augment_vs_read": ratio(augment, read)},
        "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "threads": settings.threads,
        "image_size": settings.image_size,
        "repeat": settings.repeat,
        "cpu": cpu_model(),
    }


def format_table(result: dict) -> str:
    rows = [("raw tar read (reference)", "raw_tar_read"), ("read (ShardReader)", "read"),
            ("read + decode", "decode"), ("read + decode + augment", "augment")]
    lines = [f"decoder {result['decoder']} on {result['device']}, {result['threads']} thread(s), "
             f"batch {result['batch_size']}, {result['image_size']} px, {result['images']} images",
             f"CPU: {result['cpu']}",
             f"{'stage':<28}{'images/s':>12}{'vs raw':>10}"]
    for label, name in rows:
        relative = result[name] / result["raw_tar_read"] if result["raw_tar_read"] else 0.0
        lines.append(f"{label:<28}{result[name]:>12.1f}{relative:>10.3f}")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m data_shards bench", description=__doc__.split("\n")[0])
    parser.add_argument("urls", help="shard URLs: brace pattern, '::' list, local, s3://, hdfs://, pipe:")
    parser.add_argument("--decoder", choices=("dali", "pil"), default="dali")
    parser.add_argument("--batch-size", type=int, default=64)
    default_device = "gpu" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", choices=("cpu", "gpu"), default=default_device,
                        help="where DALI decodes (gpu: nvJPEG 'mixed'); PIL always decodes on the CPU")
    parser.add_argument("--threads", type=int, default=1, help="DALI num_threads, or PIL worker threads")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--max-samples", type=int, default=None, help="stop each stage after N images")
    parser.add_argument("--repeat", type=int, default=1, help="run each stage R times, keep the fastest")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    problems = []
    if min(args.batch_size, args.threads, args.image_size, args.repeat) < 1:
        problems.append("--batch-size, --threads, --image-size and --repeat must be >= 1")
    if args.max_samples is not None and args.max_samples < 1:
        problems.append("--max-samples must be >= 1")
    if not storage.expand_urls(args.urls):
        problems.append(f"{args.urls!r} names no shard")
    if args.decoder == "dali":
        from data_shards.dali_pipeline import dali_available

        usable, reason = dali_available()
        if not usable:
            problems.append(f"--decoder dali: {reason}; or use --decoder pil")
        if args.device == "gpu" and not torch.cuda.is_available():
            problems.append("--device gpu needs a CUDA GPU and torch sees none; use --device cpu")
    if problems:
        print("bench: " + "; ".join(problems), file=sys.stderr)
        return 2
    device = args.device if args.decoder == "dali" else "cpu"
    settings = BenchSettings(args.urls, args.decoder, args.batch_size, device, args.threads, args.image_size,
                             args.max_samples, args.repeat)
    try:
        result = run_bench(settings)
    except (OSError, ValueError) as error:
        print(f"bench: {error}", file=sys.stderr)
        return 1
    print(json.dumps(result) if args.json else format_table(result))
    return 0
