"""DALI index files (``NAME.idx`` beside ``NAME.tar``) in the text format of DALI's ``wds2idx`` tool.

Format v1.2: a first line ``v1.2 <number of samples>``, then one line per sample listing, for each of
its components, ``<extension> <data offset> <size> <member name>`` separated by single spaces. A
sample is a run of consecutive members with the same basename up to the first dot of the file name;
hidden members and non-regular entries are left out, as ``wds2idx`` does.

The shard builder writes through ``IndexedTarWriter``, which records member offsets while writing, so
``index_from_members`` needs no re-scan; ``index_from_tar`` scans an existing tar and ``write_index``
stores the result::

    text = index_from_tar("data/shards/train-000000.tar")
    write_index("s3://bucket/train-000000.tar")          # -> s3://bucket/train-000000.idx

Offsets point at member data. For USTAR and pax tars (what the builder writes) the output is byte
identical to ``wds2idx``; for GNU long-name entries ``wds2idx`` reports the offset of the long-name
header instead, which DALI cannot read, so this module keeps the true data offset there.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from typing import BinaryIO

from data_shards import storage

INDEX_VERSION = "v1.2"


@dataclass(frozen=True)
class IndexEntry:
    """One regular tar member: its name, where its data starts, and its size in bytes."""

    name: str
    data_offset: int
    size: int


def split_name(name: str) -> tuple[str, str]:
    """Basename and extension split at the first dot after the last slash, exactly as ``wds2idx``."""
    dot = name.find(".", name.rfind("/") + 1)
    # Without a dot, find() gives -1 and wds2idx keeps its odd result (name minus its last character,
    # extension = the whole name); copied so that such tars index identically.
    return name[:dot], name[dot + 1:]


def index_from_members(members: Iterable[IndexEntry]) -> str:
    """The index text for regular members given in tar order; an empty result is an error, as in DALI."""
    samples: list[list[IndexEntry]] = []
    last_basename = None
    for member in members:
        basename, _ = split_name(member.name)
        if not basename or basename.endswith("/"):
            continue  # hidden files do not form or split samples
        if basename != last_basename:
            samples.append([])
            last_basename = basename
        samples[-1].append(member)
    if not samples:
        raise ValueError("no samples to index: the tar holds no regular, non-hidden members")
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    for components in samples:
        lines.append(" ".join(f"{split_name(entry.name)[1]} {entry.data_offset} {entry.size} {entry.name}"
                              for entry in components))
    return "\n".join(lines) + "\n"


class IndexedTarWriter:
    """Writes samples as a reproducible USTAR tar, recording each member's data offset for the index.

    Members get mtime 0, mode 0644 and owner 0/0 with empty names, so equal inputs give equal bytes.
    """

    def __init__(self, sink: BinaryIO) -> None:
        self._archive = tarfile.open(fileobj=sink, mode="w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
        self.entries: list[IndexEntry] = []

    def add_sample(self, key: str, members: list[tuple[str, bytes]]) -> None:
        """Add ``KEY.EXTENSION`` members in the order given."""
        for extension, data in members:
            info = tarfile.TarInfo(f"{key}.{extension}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._archive.addfile(info, io.BytesIO(data))
            padded = -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            self.entries.append(IndexEntry(info.name, self._archive.offset - padded, len(data)))

    def close(self) -> None:
        """Write the end-of-archive blocks; the sink itself stays open."""
        self._archive.close()


def entries_from_tar(source: str | bytes | BinaryIO) -> list[IndexEntry]:
    """The regular members of a tar (path, URL, bytes or open stream) with their data offsets."""
    if isinstance(source, str):
        with storage.open_read(source) as stream:
            return entries_from_tar(stream)
    stream = io.BytesIO(source) if isinstance(source, bytes | bytearray) else source
    with tarfile.open(fileobj=stream, mode="r|") as archive:
        return [IndexEntry(member.name, member.offset_data, member.size)
                for member in archive if member.isreg()]


def index_from_tar(source: str | bytes | BinaryIO) -> str:
    """Scan a tar and return its index text."""
    return index_from_members(entries_from_tar(source))


def index_url_for(tar_url: str) -> str:
    """``.../NAME.tar`` -> ``.../NAME.idx`` (the name DALI readers are given beside each shard)."""
    if not tar_url.endswith(".tar"):
        raise ValueError(f"shard name {tar_url!r} must end in .tar to get an index name beside it")
    return tar_url[: -len(".tar")] + ".idx"


def write_index(tar_url: str, index_url: str | None = None) -> str:
    """Scan ``tar_url`` and write its index (atomically) to ``index_url`` or beside it; returns where."""
    index_url = index_url or index_url_for(tar_url)
    text = index_from_tar(tar_url)
    with storage.atomic_write(index_url) as sink:
        sink.write(text.encode())
    return index_url


def parse_index(text: str) -> list[list[IndexEntry]]:
    """Samples of an index text, each a list of its components; checks the header count."""
    lines = text.splitlines()
    if not lines or not lines[0].startswith(f"{INDEX_VERSION} "):
        raise ValueError(f"not a {INDEX_VERSION} DALI index: first line {lines[0] if lines else ''!r}")
    declared = int(lines[0].split()[1])
    samples = []
    for line in lines[1:]:
        fields = line.split(" ")
        if len(fields) % 4:
            raise ValueError(f"malformed index line (fields must come in fours): {line!r}")
        samples.append([IndexEntry(fields[i + 3], int(fields[i + 1]), int(fields[i + 2]))
                        for i in range(0, len(fields), 4)])
    if declared != len(samples):
        raise ValueError(f"index declares {declared} samples but lists {len(samples)}")
    return samples
