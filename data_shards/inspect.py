"""``python -m data_shards inspect URLS [--json] [--samples K]``: what a set of shards holds.

Reads every shard once in order (local paths, brace patterns, ``s3://``, ``hdfs://``, ``pipe:``) and
reports the number of shards and samples, the skipped members by reason, the member extensions and
JSON fields seen with their counts, and the first few samples. ``--json`` prints one JSON object::

    {"shards": 16, "samples": 2000, "skipped": {"undecodable json": 1}, "fields": {"jpg": 2000, ...},
     "json_fields": {"width": 2000, ...}, "per_shard": {"train-000000.tar": 125, ...}, "examples": [...]}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter

from tqdm import tqdm

from data_shards import storage
from data_shards.reader import ShardReader
from data_shards.tar_samples import is_image_extension


def summarize(urls: str, *, examples: int = 3, hdfs_command: str = "hdfs dfs -cat", progress: bool = False) -> dict:
    reader = ShardReader(urls, shard_shuffle=False, hdfs_command=hdfs_command)
    fields: Counter = Counter()
    json_fields: Counter = Counter()
    per_shard: Counter = Counter()
    shown = []
    for sample in tqdm(reader, desc="inspect", unit=" samples", disable=not progress, file=sys.stderr):
        per_shard[os.path.basename(sample["__url__"])] += 1
        fields.update(ext for ext in sample if not ext.startswith("__"))
        if isinstance(sample.get("json"), dict):
            json_fields.update(sample["json"].keys())
        if len(shown) < examples:
            shown.append(_example(sample))
    return {
        "shards": len(reader.all_shards),
        "samples": sum(per_shard.values()),
        "skipped": dict(reader.skipped),
        "fields": dict(sorted(fields.items())),
        "json_fields": dict(sorted(json_fields.items())),
        "per_shard": dict(per_shard),
        "examples": shown,
    }


def _example(sample: dict) -> dict:
    shown = {"key": sample["__key__"], "shard": os.path.basename(sample["__url__"])}
    for ext, value in sample.items():
        if ext.startswith("__"):
            continue
        if is_image_extension(ext) or isinstance(value, bytes):
            shown[ext] = f"<{len(value)} bytes>"
        else:
            shown[ext] = value
    return shown


def print_readable(report: dict) -> None:
    print(f"shards:  {report['shards']}")
    print(f"samples: {report['samples']}")
    skipped = report["skipped"]
    print("skipped: " + (", ".join(f"{reason}: {count}" for reason, count in skipped.items()) or "none"))
    print("members: " + ", ".join(f"{ext} ({count})" for ext, count in report["fields"].items()))
    if report["json_fields"]:
        print("json fields: " + ", ".join(f"{key} ({count})" for key, count in report["json_fields"].items()))
    for example in report["examples"]:
        print(f"\n-- {example['shard']} / {example['key']}")
        for ext, value in example.items():
            if ext in ("key", "shard"):
                continue
            text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value
            print(f"  {ext}: {text[:300]}{'...' if len(text) > 300 else ''}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_shards inspect", description=__doc__.splitlines()[0])
    parser.add_argument("urls", help="shards: path, brace pattern, s3://, hdfs://, pipe:, '::'-separated list")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--samples", type=int, default=3, help="how many example samples to show")
    parser.add_argument("--hdfs-command", default="hdfs dfs -cat", help="client command for hdfs:// URLs")
    args = parser.parse_args(argv)
    try:
        report = summarize(args.urls, examples=args.samples, hdfs_command=args.hdfs_command,
                           progress=not args.json)
    except (ValueError, storage.SourceUnreachable) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
    else:
        print_readable(report)
    return 0
