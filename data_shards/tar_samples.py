"""Turn one WebDataset tar stream into samples: members grouped by key, text and JSON decoded.

A sample is a dict ``{"__key__", "__url__", "__index__", <ext>: value, ...}`` where image members stay
bytes (``jpg``, ``png``, ``webp``, ``0.jpg``, ...), ``txt`` becomes ``str`` and ``json`` becomes a dict.
The key of a member is its path up to the first dot of the basename (the WebDataset and DALI rule);
the rest is the extension, lower-cased. Broken input never raises: a truncated tar ends the shard,
a sample without an image or with undecodable text/JSON is dropped, and each case is counted.

Used by :mod:`data_shards.reader`; run ``python -m data_shards inspect SHARDS`` to see it at work.
"""

from __future__ import annotations

import json
import os
import tarfile
from collections import Counter
from collections.abc import Iterator
from typing import BinaryIO

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")

# Reasons a sample or a shard is skipped; these strings are what the training log shows.
SKIP_TRUNCATED = "truncated or unreadable tar"
SKIP_NO_IMAGE = "sample without image"
SKIP_BAD_TEXT = "undecodable txt"
SKIP_BAD_JSON = "undecodable json"
SKIP_DUPLICATE = "duplicate member in sample"
SKIP_UNDECODABLE_IMAGE = "undecodable image"


def split_member_name(name: str) -> tuple[str, str]:
    """``dir/abc.0.jpg`` -> (``dir/abc``, ``0.jpg``): the key ends at the first dot of the basename."""
    directory, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    key = os.path.join(directory, stem) if directory else stem
    return key, ext.lower() if dot else ""


def is_image_extension(ext: str) -> bool:
    return ext.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS


def _finish(raw: dict, url: str, index: int, skipped: Counter) -> dict | None:
    """Decode text/JSON members and check the sample has an image; None (counted) when unusable."""
    if not any(is_image_extension(ext) for ext in raw if not ext.startswith("__")):
        skipped[SKIP_NO_IMAGE] += 1
        return None
    sample = {"__url__": url, "__index__": index}
    for ext, value in raw.items():
        if ext == "txt":
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                skipped[SKIP_BAD_TEXT] += 1
                return None
        elif ext == "json":
            try:
                value = json.loads(value)
            except (UnicodeDecodeError, json.JSONDecodeError):
                skipped[SKIP_BAD_JSON] += 1
                return None
        sample[ext] = value
    return sample


def iter_raw_groups(stream: BinaryIO, skipped: Counter) -> Iterator[dict]:
    """Group consecutive members by key into ``{"__key__": key, ext: bytes}`` dicts, in tar order.

    A repeated extension under the same key starts a new group (keys are not always unique across
    concatenated sources, as in LAION); the repeat is counted.
    """
    current: dict | None = None
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as archive:
            for member in archive:
                if not member.isfile() or os.path.basename(member.name).startswith("."):
                    continue
                key, ext = split_member_name(member.name)
                # Decide on the group from the header, before reading data that may be cut short.
                if current is not None and (key != current["__key__"] or ext in current):
                    if key == current["__key__"]:
                        skipped[SKIP_DUPLICATE] += 1
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key}
                handle = archive.extractfile(member)
                current[ext] = handle.read() if handle is not None else b""
    except (tarfile.TarError, EOFError, OSError, ValueError):
        # The shard ends here; the sample being assembled may have lost members, so it goes too.
        skipped[SKIP_TRUNCATED] += 1
        return
    if current is not None:
        yield current


def iter_samples(
    stream: BinaryIO, url: str, skipped: Counter, *, start: int = 0, wanted: set[int] | None = None
) -> Iterator[dict]:
    """Yield decoded samples of one shard with ``__index__`` = position among the shard's key groups.

    ``start`` skips the first groups without decoding them (resume); ``wanted`` keeps only the
    listed positions (refilling a restored shuffle buffer).
    """
    for index, raw in enumerate(iter_raw_groups(stream, skipped)):
        if index < start or (wanted is not None and index not in wanted):
            continue
        sample = _finish(raw, url, index, skipped)
        if sample is not None:
            yield sample
