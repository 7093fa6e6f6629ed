"""What the training entry points ask of shard sources before they start: do they exist, how many samples.

    check_sources(["data/train-{000000..000099}.tar", "s3://bucket/cc3m-{000000..000329}.tar"], mode="exact")
    total = samples_in("data/train-{000000..000099}.tar")      # from the sizes.json beside the shards

``check_sources`` fails at once, naming the pattern, when a source matches nothing: a typo'd folder, a
brace range past the last shard, an S3 prefix without objects. Local sources are checked file by file;
an S3 source by a HEAD of its first object and, when that one is missing, one listing; ``hdfs://`` and
``pipe:`` sources cannot be asked cheaply and are left to the reader. In ``exact`` mode every shard must
exist; in ``resampled`` mode missing ones only warn (the reader skips shards it cannot find).

``samples_in`` sums the builder's ``sizes.json`` entries (the OpenCLIP convention) for a shard list. A
``pipe:`` source has no folder to look in: it runs exactly the configured command, so its count must be
configured. Every problem is a :class:`ShardSourceError` naming the source and what to set or fix; the
entry points turn it into their own configuration error.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence

from data_shards import storage

MODES = ("exact", "resampled")


class ShardSourceError(ValueError):
    """A configured shard source that cannot be used as given; the message names it and the fix."""


class NoShards(ShardSourceError):
    """A shard pattern that matches nothing (or, in exact mode, misses some shards)."""


class SizesUnknown(ShardSourceError):
    """No sample count for a shard list: sizes.json is missing, incomplete, or cannot exist (``pipe:``)."""


def check_sources(specs: str | Sequence[str], *, mode: str = "exact") -> None:
    """Raise :class:`NoShards` for the first source piece (``::`` part of a spec) that matches nothing."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    for spec in [specs] if isinstance(specs, str) else specs:
        for piece in spec.split("::"):
            piece = piece.strip()
            if piece:
                _check_piece(piece, mode)


def _check_piece(pattern: str, mode: str) -> None:
    urls = storage.expand_urls(pattern)
    try:
        scheme = storage.scheme(urls[0])
    except ValueError as error:
        raise NoShards(f"shard pattern {pattern!r}: {error}") from None
    if scheme == "local":
        missing = [url for url in urls if not storage.exists(url)]
    elif scheme == "s3":
        missing = _missing_s3(pattern, urls)
    else:
        return  # hdfs and pipe: only reading them tells
    if len(missing) == len(urls):
        kind = "file" if scheme == "local" else "object"
        tried = f"{len(urls)} name(s) tried, e.g. {urls[0]}" if len(urls) > 1 else f"tried {urls[0]}"
        raise NoShards(f"shard pattern {pattern!r} matches no {kind} ({tried}); check the folder, the name "
                       f"and the brace range")
    if missing and mode == "exact":
        raise NoShards(f"{len(missing)} of {len(urls)} shards of {pattern!r} do not exist (first: {missing[0]}); "
                       "exact mode reads every shard: fix the pattern, build the missing shards, or read in "
                       "resampled mode")
    if missing:
        warnings.warn(f"{len(missing)} of {len(urls)} shards of {pattern!r} do not exist (first: {missing[0]}); "
                      "resampled reading skips them", RuntimeWarning, stacklevel=3)


def _missing_s3(pattern: str, urls: list[str]) -> list[str]:
    """A HEAD of the first shard; only when it is missing, one listing decides between some and none."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket = urls[0][len("s3://"):].partition("/")[0]
    wanted = {url[len(f"s3://{bucket}/"):] for url in urls if url.startswith(f"s3://{bucket}/")}
    try:
        if storage.exists(urls[0]):
            return []
        if len(wanted) < len(set(urls)):  # a pattern over several buckets: the first shard is what is known
            return [urls[0]]
        prefix = os.path.commonprefix(sorted(wanted))
        found = set()
        pages = storage.s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for page in pages:
            found.update(item["Key"] for item in page.get("Contents", []) if item["Key"] in wanted)
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") == "NoSuchBucket":
            raise NoShards(f"shard pattern {pattern!r}: bucket {bucket!r} does not exist; check the URL") from None
        raise ShardSourceError(f"cannot check shard pattern {pattern!r} at {urls[0]}: {error}") from None
    except BotoCoreError as error:  # an unreachable endpoint, missing credentials
        raise ShardSourceError(f"cannot check shard pattern {pattern!r} at {urls[0]}: {error}") from None
    return [url for url in urls if url[len(f"s3://{bucket}/"):] not in found]


def samples_in(urls: str, *, setting: str = "data.samples_per_epoch") -> int:
    """Sample count of a shard list from the ``sizes.json`` the builder writes beside the shards.

    ``setting`` names the configuration key that gives the count instead, for the messages.
    """
    total = 0
    by_folder: dict[str, dict] = {}
    for url in storage.expand_urls(urls):
        try:
            scheme = storage.scheme(url)
        except ValueError as error:
            raise SizesUnknown(f"{error}; fix the URL or set {setting}") from None
        if scheme == "pipe":
            raise SizesUnknown(f"{url!r} is a pipe: command, which is run exactly as configured and has no folder "
                               f"to hold a sizes.json; set {setting}")
        folder, name = storage.parent(url), url.rpartition("/")[2]
        sizes_url = storage.join(folder, "sizes.json")
        if folder not in by_folder:
            by_folder[folder] = _read_sizes(sizes_url, url, setting)
        count = by_folder[folder].get(name)
        if count is None:
            raise SizesUnknown(f"{sizes_url} has no entry for {name}; set {setting}")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise SizesUnknown(f"{sizes_url}: the entry for {name} is {count!r}, not a sample count; rebuild the "
                               f"shards or set {setting}")
        total += count
    return total


def _read_sizes(sizes_url: str, shard_url: str, setting: str) -> dict:
    # A missing local file will not appear by retrying; remote stores get the usual retries.
    retries = 1 if storage.scheme(sizes_url) == "local" else 3
    try:
        sizes = json.loads(storage.read_bytes(sizes_url, retries=retries))
    except (OSError, ValueError):
        raise SizesUnknown(f"no readable sizes.json beside {shard_url}; set {setting}") from None
    if not isinstance(sizes, dict):
        raise SizesUnknown(f"{sizes_url} does not hold {{shard name: sample count}}; rebuild the shards or set "
                           f"{setting}")
    return sizes
