"""``python -m data_shards build``: annotation files + images -> WebDataset shards, locally or on S3.

    python -m data_shards build --input train.json --format albef --image-root images \\
        --output 's3://bucket/cc3m/train-%06d.tar' --samples-per-shard 10000 --workers 16

Each sample holds ``KEY.jpg`` (or ``.png``/``.webp`` kept as-is; ``KEY.0.jpg``/``KEY.1.jpg`` for two
images), ``KEY.txt`` (main caption) and ``KEY.json`` (the record's meta plus ``width``/``height`` of the
stored image, ``source`` and ``origin``; lists of sizes for two-image samples). Boxes are converted to
xyxy pixels of the stored image, clipped, and dropped when empty. Beside the shards go ``NAME.idx``
(DALI index), ``sizes.json`` and ``manifest.json``.

Records are assigned to shards before any processing (optional shuffle with ``--seed``, then groups
by count and estimated bytes), so every shard is a fixed job: workers build shards independently,
bytes do not depend on ``--workers``, and a killed build re-run with the same arguments skips the
shards whose ``.tar`` and ``.idx`` both exist (the ``.idx`` is written last) and recounts them.
Bad records are rejected with a reason, never fatal; the exit status is 1 when the rejected fraction
exceeds ``--max-reject-fraction``. Image paths in the annotations are data: they are read only under
``--image-root``, as s3/hdfs URLs only with ``--allow-image-scheme``, and never as ``pipe:`` commands
(see :mod:`data_shards.image_refs`).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import multiprocessing
import os
import queue
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field

from tqdm import tqdm

from data_shards import storage
from data_shards.adapters import FORMATS, Reject, SourceRecord, iter_records
from data_shards.dali_index import (
    INDEX_VERSION,
    IndexedTarWriter,
    index_from_members,
    index_url_for,
    parse_index,
    split_name,
)
from data_shards.image_refs import ALLOWABLE_SCHEMES
from data_shards.shard_samples import SampleOptions, SampleRejected, build_members, count_box_fixes, is_url

MAX_REJECT_EXAMPLES = 20
OUTPUT_FILES = ["sizes.json", "manifest.json"]


class BuildError(Exception):
    """A problem the user must fix (bad arguments, unreadable inputs, a foreign shard in the output)."""


@dataclass(frozen=True)
class PlannedSample:
    key: str
    input_index: int
    record: SourceRecord


@dataclass(frozen=True)
class ShardJob:
    index: int
    tar_url: str
    samples: tuple[PlannedSample, ...]
    options: SampleOptions


@dataclass
class Tally:
    """Counts for one input file (or one input's share of one shard)."""

    records: int = 0
    written: int = 0
    rejects: Counter = field(default_factory=Counter)
    examples: list = field(default_factory=list)
    boxes_clipped: int = 0
    boxes_dropped: int = 0

    def reject(self, origin: str, reason: str, detail: str = "") -> None:
        self.rejects[reason] += 1
        if len(self.examples) < MAX_REJECT_EXAMPLES:
            self.examples.append({"origin": origin, "reason": reason, "detail": detail})

    def merge(self, other: Tally) -> None:
        self.records += other.records
        self.written += other.written
        self.rejects.update(other.rejects)
        self.examples.extend(other.examples[: MAX_REJECT_EXAMPLES - len(self.examples)])
        self.boxes_clipped += other.boxes_clipped
        self.boxes_dropped += other.boxes_dropped


@dataclass
class ShardResult:
    index: int
    name: str
    written: int
    bytes: int
    tallies: dict[int, Tally]
    skipped: bool


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m data_shards build", description=(
        "Annotation files + images -> WebDataset shards with DALI indexes, sizes.json and manifest.json."))
    parser.add_argument("--input", action="append", required=True, help="annotation file (repeatable)")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--image-root", required=True,
                        help="folder (or s3://, hdfs:// URL) the annotation's image paths start from; images "
                             "outside it are not read")
    parser.add_argument("--allow-image-scheme", action="append", default=[], choices=ALLOWABLE_SCHEMES,
                        help="also read annotation image URLs of this scheme outside --image-root (repeatable)")
    parser.add_argument("--output", required=True, help="shard pattern, e.g. 'out/train-%%06d.tar' or s3://...")
    parser.add_argument("--samples-per-shard", type=int, required=True)
    parser.add_argument("--max-shard-bytes", type=int, default=None,
                        help="also start a new shard before the source image bytes exceed this")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--resize-max-side", type=int, default=None,
                        help="downscale (and re-encode) images whose longer side exceeds this")
    parser.add_argument("--seed", type=int, default=None, help="shuffle records before sharding")
    parser.add_argument("--max-reject-fraction", type=float, default=0.05)
    parser.add_argument("--detections", default=None, help="detections file for formats that use one")
    parser.add_argument("--jpeg-quality", type=int, default=95)
    return parser.parse_args(argv)


def check_arguments(args: argparse.Namespace) -> None:
    for path in args.input:
        if not os.path.isfile(path):
            raise BuildError(f"annotation file {path} not found; check --input")
    root_scheme = _scheme_or_none(args.image_root)
    if root_scheme not in ("local", *ALLOWABLE_SCHEMES) or args.image_root.startswith("file://"):
        raise BuildError(f"--image-root {args.image_root!r}: use a local folder or an s3:// or hdfs:// URL")
    if root_scheme == "local" and not os.path.isdir(args.image_root):
        raise BuildError(f"image folder {args.image_root} not found; check --image-root")
    if args.detections and not os.path.isfile(args.detections):
        raise BuildError(f"detections file {args.detections} not found; check --detections")
    try:
        first, second = args.output % 0, args.output % 1
    except (TypeError, ValueError):
        first = second = ""
    if first == second or not first.endswith(".tar"):
        raise BuildError(f"--output {args.output!r} needs one %d-style field for the shard number and a .tar "
                         "ending, e.g. 'out/train-%06d.tar'")
    if _scheme_or_none(args.output) not in ("local", "s3"):
        raise BuildError(f"--output {args.output!r}: shards are written to a local path or an s3:// URL")
    for name in ("samples_per_shard", "workers", "max_shard_bytes", "resize_max_side"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise BuildError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if not 1 <= args.jpeg_quality <= 100:
        raise BuildError(f"--jpeg-quality must be within 1..100, got {args.jpeg_quality}")


def _scheme_or_none(url: str) -> str | None:
    try:
        return storage.scheme(url)
    except ValueError:
        return None


def collect_records(args: argparse.Namespace) -> tuple[list[PlannedSample], list[Tally]]:
    """Every record of every input, keyed by its position in the concatenated inputs."""
    samples: list[PlannedSample] = []
    tallies = [Tally() for _ in args.input]
    position = 0
    for input_index, path in enumerate(args.input):
        try:
            for item in iter_records(args.format, path, args.image_root, detections=args.detections,
                                     allowed_schemes=tuple(args.allow_image_scheme)):
                tallies[input_index].records += 1
                if isinstance(item, Reject):
                    tallies[input_index].reject(item.origin, item.reason, item.detail)
                else:
                    samples.append(PlannedSample(f"{position:09d}", input_index, item))
                position += 1
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise BuildError(f"cannot read annotation file {path} as {args.format}: {error}") from error
    return samples, tallies


def source_bytes(sample: PlannedSample) -> int:
    """Local image file sizes; URLs count 0 (a HEAD request per record would cost more than it helps)."""
    total = 0
    for path in sample.record.image_paths:
        if not is_url(path):
            with contextlib.suppress(OSError):  # a missing image is rejected later; it adds nothing
                total += os.path.getsize(path)
    return total


def plan_shards(samples: list[PlannedSample], args: argparse.Namespace) -> list[list[PlannedSample]]:
    """Deterministic assignment of samples to shards, made before any image is touched."""
    order = list(samples)
    if args.seed is not None:
        random.Random(args.seed).shuffle(order)
    shards: list[list[PlannedSample]] = []
    current: list[PlannedSample] = []
    current_bytes = 0
    for sample in order:
        estimate = source_bytes(sample) if args.max_shard_bytes else 0
        full = len(current) >= args.samples_per_shard
        too_big = args.max_shard_bytes and current and current_bytes + estimate > args.max_shard_bytes
        if full or too_big:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(sample)
        current_bytes += estimate
    if current:
        shards.append(current)
    return shards


def _write_shard(job: ShardJob, index_url: str, progress) -> ShardResult:
    tallies: dict[int, Tally] = {}
    with storage.atomic_write(job.tar_url) as sink:
        writer = IndexedTarWriter(sink)
        for sample in job.samples:
            tally = tallies.setdefault(sample.input_index, Tally())
            try:
                members, clipped, dropped = build_members(sample.key, sample.record, job.options)
            except SampleRejected as rejected:
                tally.reject(sample.record.origin, rejected.reason, rejected.detail)
            else:
                writer.add_sample(sample.key, members)
                tally.written += 1
                tally.boxes_clipped += clipped
                tally.boxes_dropped += dropped
            progress(1)
        writer.close()
        shard_bytes = sink.tell()
    # An all-rejected shard still gets an index, so it counts as finished on a re-run.
    text = index_from_members(writer.entries) if writer.entries else f"{INDEX_VERSION} 0\n"
    with storage.atomic_write(index_url) as sink:
        sink.write(text.encode())
    written = sum(tally.written for tally in tallies.values())
    return ShardResult(job.index, job.tar_url.rpartition("/")[2], written, shard_bytes, tallies, False)


def _recount_shard(job: ShardJob, index_url: str, progress) -> ShardResult:
    """Counts for a shard an earlier run finished: written keys from its index, reasons recomputed."""
    try:
        indexed = parse_index(storage.read_bytes(index_url).decode())
    except ValueError as error:  # not UTF-8 or not v1.2: not an index of ours: never guess what the tar holds
        raise BuildError(f"{index_url} is not a DALI index this builder wrote ({error}); remove it or choose "
                         "another --output") from None
    written_keys = {split_name(sample[0].name)[0] for sample in indexed}
    planned = {sample.key for sample in job.samples}
    foreign = sorted(written_keys - planned)
    mismatch = (f"{job.tar_url} exists but was built from other inputs or options (key {{}}); remove the "
                "output or choose another --output")
    if foreign:
        raise BuildError(mismatch.format(foreign[0]))
    tallies: dict[int, Tally] = {}
    for sample in job.samples:
        tally = tallies.setdefault(sample.input_index, Tally())
        if sample.key in written_keys:
            clipped, dropped = count_box_fixes(sample.record, job.options)
            tally.written += 1
            tally.boxes_clipped += clipped
            tally.boxes_dropped += dropped
        else:
            try:
                build_members(sample.key, sample.record, job.options)
            except SampleRejected as rejected:
                tally.reject(sample.record.origin, rejected.reason, rejected.detail)
            else:  # e.g. an image URL that failed then and answers now; the shard stays as it is
                tally.reject(sample.record.origin, "rejected by the run that wrote this shard")
        progress(1)
    name = job.tar_url.rpartition("/")[2]
    return ShardResult(job.index, name, len(written_keys), storage.size(job.tar_url), tallies, True)


def run_shard_job(job: ShardJob, progress=lambda count: None) -> ShardResult:
    """Build one shard, or recount it when an earlier run already finished it (.tar and .idx exist)."""
    index_url = index_url_for(job.tar_url)
    if storage.exists(job.tar_url) and storage.exists(index_url):
        return _recount_shard(job, index_url, progress)
    return _write_shard(job, index_url, progress)


class _QueueProgress:
    """Picklable progress callback for pool workers: batches counts onto a manager queue."""

    def __init__(self, updates) -> None:
        self.updates = updates
        self.pending = 0
        self.last_sent = time.monotonic()

    def __call__(self, count: int) -> None:
        self.pending += count
        if time.monotonic() - self.last_sent > 0.2:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.updates.put(self.pending)
        self.pending, self.last_sent = 0, time.monotonic()


def _run_in_worker(job: ShardJob, updates) -> ShardResult:
    progress = _QueueProgress(updates)
    result = run_shard_job(job, progress)
    progress.flush()
    return result


def run_jobs(jobs: list[ShardJob], workers: int) -> list[ShardResult]:
    total = sum(len(job.samples) for job in jobs)
    with tqdm(total=total, unit="sample", file=sys.stderr, desc="build", smoothing=0.1) as bar:
        if workers == 1 or len(jobs) <= 1:
            return [run_shard_job(job, bar.update) for job in jobs]
        # spawn, not fork: the parent may hold boto3 connections and threads that must not be copied.
        context = multiprocessing.get_context("spawn")
        with context.Manager() as manager, context.Pool(min(workers, len(jobs))) as pool:
            updates = manager.Queue()
            pending = [pool.apply_async(_run_in_worker, (job, updates)) for job in jobs]
            while not all(result.ready() for result in pending):
                with contextlib.suppress(queue.Empty):
                    bar.update(updates.get(timeout=0.1))
            results = [result.get() for result in pending]  # re-raises a worker's exception here
            while not updates.empty():
                bar.update(updates.get())
            return results


def by_count(counts: Counter) -> dict[str, int]:
    """Most frequent first; ties by name, so the manifest does not depend on merge order."""
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def summarize(args, input_tallies: list[Tally], results: list[ShardResult], seconds: float) -> dict:
    for result in sorted(results, key=lambda item: item.index):
        for input_index, tally in sorted(result.tallies.items()):
            input_tallies[input_index].merge(tally)
    inputs = []
    for path, tally in zip(args.input, input_tallies, strict=True):
        inputs.append({"path": path, "records": tally.records, "written": tally.written,
                       "rejected": sum(tally.rejects.values()), "rejects": by_count(tally.rejects),
                       "reject_examples": tally.examples,
                       "boxes": {"clipped": tally.boxes_clipped, "dropped": tally.boxes_dropped}})
    all_rejects = sum((Counter(entry["rejects"]) for entry in inputs), Counter())
    return {
        "records": sum(entry["records"] for entry in inputs),
        "written": sum(entry["written"] for entry in inputs),
        "rejected": sum(all_rejects.values()),
        "rejects": by_count(all_rejects),
        "boxes": {kind: sum(entry["boxes"][kind] for entry in inputs) for kind in ("clipped", "dropped")},
        "shards": len(results),
        "shards_skipped": sum(result.skipped for result in results),
        "empty_shards": [result.name for result in results if result.written == 0],
        "total_bytes": sum(result.bytes for result in results),
        "seconds": round(seconds, 3),
        "inputs": inputs,
        "arguments": vars(args),
    }


def write_json(url: str, value: dict) -> None:
    with storage.atomic_write(url) as sink:
        sink.write((json.dumps(value, indent=2) + "\n").encode())


def merged_sizes(folder: str, results: list[ShardResult]) -> dict:
    """One sizes.json per folder (OpenCLIP): keep other builds' shards there, update ours."""
    sizes_url = storage.join(folder, "sizes.json")
    sizes = {}
    if storage.exists(sizes_url):
        with contextlib.suppress(ValueError):
            sizes = json.loads(storage.read_bytes(sizes_url))
    if not isinstance(sizes, dict):  # unreadable as {name: count}: rewritten from this build, as broken JSON is
        sizes = {}
    sizes.update({result.name: result.written for result in results})
    return dict(sorted(sizes.items()))


def check_writable(folder: str) -> None:
    """Fail before any work when a local output folder cannot take files (S3 answers on the first write)."""
    if storage.scheme(folder) != "local":
        return
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        message = _not_writable(error, folder)
        if message is None:
            raise
        raise BuildError(message) from None


_NOT_WRITABLE = {errno.EACCES: "permission denied", errno.EPERM: "permission denied",
                 errno.EROFS: "read-only file system"}


def _not_writable(error: BaseException, folder: str) -> str | None:
    """The plain message for a write the user must redirect (a re-run would fail the same way), else None."""
    reason = _NOT_WRITABLE.get(getattr(error, "errno", None))
    response = getattr(error, "response", None)  # botocore's ClientError
    code = response.get("Error", {}).get("Code") if isinstance(response, dict) else None
    if code in ("AccessDenied", "AllAccessDisabled"):
        reason = "access denied"
    elif code == "NoSuchBucket":
        reason = "no such bucket"
    if reason is None:
        return None
    return f"cannot write to {folder}: {reason}; choose a writable --output"


def build(args: argparse.Namespace) -> int:
    started = time.monotonic()
    check_arguments(args)
    samples, input_tallies = collect_records(args)
    if not any(tally.records for tally in input_tallies):
        raise BuildError(f"no records in {', '.join(args.input)} for format {args.format}; check --format")
    check_writable(storage.parent(args.output % 0))
    options = SampleOptions(resize_max_side=args.resize_max_side, jpeg_quality=args.jpeg_quality,
                            source=args.format)
    groups = plan_shards(samples, args)
    jobs = [ShardJob(index, args.output % index, tuple(group), options) for index, group in enumerate(groups)]
    folder = storage.parent(args.output % 0)
    ours = [index_url_for(job.tar_url) for job in jobs] + [job.tar_url for job in jobs]
    # Leftovers of killed writes: stored but invisible, and nothing will ever finish them.
    storage.discard_partial_writes(folder, [url.rpartition("/")[2] for url in ours] + OUTPUT_FILES)
    results = sorted(run_jobs(jobs, args.workers), key=lambda result: result.index)
    manifest = summarize(args, input_tallies, results, time.monotonic() - started)
    write_json(storage.join(folder, "sizes.json"), merged_sizes(folder, results))
    write_json(storage.join(folder, "manifest.json"), manifest)
    print(f"wrote {manifest['written']} samples in {len(results)} shards ({manifest['shards_skipped']} "
          f"already done) to {folder}; rejected {manifest['rejected']} of {manifest['records']}",
          file=sys.stderr)
    if manifest["empty_shards"]:
        print(f"warning: every record of {', '.join(manifest['empty_shards'])} was rejected; these shards "
              "are empty and DALI refuses their indexes, so leave them out of DALI readers", file=sys.stderr)
    fraction = manifest["rejected"] / manifest["records"]
    if fraction > args.max_reject_fraction:
        worst = ", ".join(f"{reason} ({count})" for reason, count in list(manifest["rejects"].items())[:3])
        print(f"error: rejected {manifest['rejected']} of {manifest['records']} records ({fraction:.1%}), "
              f"more than --max-reject-fraction {args.max_reject_fraction}; worst reasons: {worst}; "
              f"examples in {storage.join(folder, 'manifest.json')}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str]) -> int:
    args = parse_arguments(argv)
    try:
        return build(args)
    except BuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Exception as error:
        # Output failures: a write the user must redirect gets that said plainly; only a transient one
        # (network, a full disk since freed) is helped by resuming.
        if not isinstance(error, OSError) and not _is_storage_client_error(error):
            raise
        message = _not_writable(error, _output_folder(args.output))
        if message is not None:
            print(f"error: {message}", file=sys.stderr)
            return 2
        print(f"error: {error}; re-run the same command to resume (finished shards are kept)",
              file=sys.stderr)
        return 1


def _output_folder(output: str) -> str:
    try:
        return storage.parent(output % 0)
    except (TypeError, ValueError):
        return output


def _is_storage_client_error(error: BaseException) -> bool:
    """botocore's errors (S3 refusals, unreachable endpoints), recognised without importing boto3 first."""
    return type(error).__module__.startswith("botocore.")
