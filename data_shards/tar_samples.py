"""Turn one WebDataset tar stream into samples: members grouped by key, text and JSON decoded.

A sample is a dict ``{"__key__", "__url__", "__index__", <ext>: value, ...}`` where image members stay
bytes (``jpg``, ``png``, ``webp``, ``0.jpg``, ...), ``txt`` becomes ``str`` and ``json`` becomes a dict.
The key of a member is its path up to the first dot of the basename (the WebDataset and DALI rule);
the rest is the extension, lower-cased. Broken input never raises: a truncated tar ends the shard,
a sample without an image or with undecodable text/JSON is dropped, and each case is counted.

The tar itself is parsed here rather than by ``tarfile``, whose per-member objects and checks cost more
than the rest of the reader (``python -m data_shards bench`` compares the two): :class:`TarMembers` reads
one 512-byte header and then one padded payload per member with nothing but ``read(n)``, so pipes and S3
bodies work. It follows ustar (prefix field), GNU (long names, base-256 sizes) and pax (``path``, ``size``)
headers, verifies header checksums, skips what is not a regular file, and reads gzip, bzip2 and xz tars
through the standard decompressors.

Used by :mod:`data_shards.reader`; run ``python -m data_shards inspect SHARDS`` to see it at work.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import struct
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from typing import BinaryIO

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")

# Reasons a sample or a shard is skipped; these strings are what the training log shows.
SKIP_TRUNCATED = "truncated or unreadable tar"
SKIP_NO_IMAGE = "sample without image"
SKIP_BAD_TEXT = "undecodable txt"
SKIP_BAD_JSON = "undecodable json"
SKIP_DUPLICATE = "duplicate member in sample"
SKIP_UNDECODABLE_IMAGE = "undecodable image"
SKIP_IMAGE_TOO_LARGE = "image too large"  # over Pillow's decompression-bomb limit
SKIP_UNSUPPORTED_IMAGE_MODE = "unsupported image mode"  # 32-bit integer or float pixels
SKIP_UNSUPPORTED_IMAGE_FORMAT = "image format DALI does not decode"  # GIF, ICO, ...: the PIL path decodes them
SKIP_VANISHED_SHARD = "shard not found (vanished)"  # resampled mode: counted once per shard, then never drawn

BLOCK_SIZE = 512
_ZERO_BLOCK = bytes(BLOCK_SIZE)
_CHECKSUM_FIELD_AS_SPACES = 8 * ord(" ")
_SKIP_CHUNK_BYTES = 1 << 20
_NEWLINE = ord("\n")
# Header type flags, compared as the byte values that indexing a header gives.
_REGULAR_TYPES = frozenset(b"07\0")  # regular, contiguous and old (pre-POSIX) regular files
_TYPES_WITHOUT_DATA = frozenset(b"123456")  # links, devices, directories, FIFOs: the size field describes no data
_GNU_LONG_NAME, _GNU_LONG_LINK, _GNU_SPARSE, _PAX_GLOBAL = b"LKSg"
_METADATA_TYPES = frozenset(b"LKxXg")  # describe the member that follows (g: all that follow)


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


class TarFormatError(ValueError):
    """The stream is not a whole, well-formed tar: cut short, a bad header checksum or a malformed field."""


def _read_exactly(read: Callable[[int], bytes], size: int) -> bytes:
    """``size`` bytes, or fewer only at end of stream: pipes and S3 bodies may return short reads before it."""
    data = read(size)
    if len(data) == size or not data:
        return data
    parts = [data]
    missing = size - len(data)
    while missing:
        more = read(missing)
        if not more:
            break
        parts.append(more)
        missing -= len(more)
    return b"".join(parts)


def _padded(size: int) -> int:
    return (size + BLOCK_SIZE - 1) // BLOCK_SIZE * BLOCK_SIZE


def _read_payload(read: Callable[[int], bytes], size: int) -> bytes:
    """A member's ``size`` bytes, read with its padding in one call so the stream stays block-aligned."""
    padded = _padded(size)
    data = _read_exactly(read, padded)
    if len(data) != padded:
        raise TarFormatError(f"the stream ends inside a {size}-byte member")
    return data if padded == size else data[:size]


def _skip(read: Callable[[int], bytes], size: int) -> None:
    # Chunked, so a huge unwanted member (a video, a dump) never has to fit in memory.
    remaining = _padded(size)
    while remaining:
        chunk = _read_exactly(read, min(remaining, _SKIP_CHUNK_BYTES))
        if not chunk:
            raise TarFormatError(f"the stream ends inside a skipped {size}-byte member")
        remaining -= len(chunk)


def _cut_at_nul(field: bytes) -> bytes:
    end = field.find(b"\0")
    return field if end < 0 else field[:end]


def _parse_number(field: bytes) -> int:
    """An octal header number, or GNU base-256 (first byte 0x80) for values too large for octal digits."""
    if field[0] & 0x80:
        if field[0] != 0x80:  # 0xff marks a negative number: no size or checksum can be one
            raise TarFormatError("negative or malformed base-256 number in a tar header")
        return int.from_bytes(field[1:], "big")
    digits = _cut_at_nul(field).strip()
    try:
        value = int(digits, 8) if digits else 0
    except ValueError:
        raise TarFormatError(f"malformed octal number {digits!r} in a tar header") from None
    if value < 0:
        raise TarFormatError("negative number in a tar header")
    return value


def _checksum_matches(header: bytes) -> bool:
    """The stored sum equals the header's byte sum with the checksum field read as spaces.

    Some old writers summed signed bytes, so that variant is accepted too (as tarfile and GNU tar do).
    """
    stored = _parse_number(header[148:156])
    unsigned = sum(header) - sum(header[148:156]) + _CHECKSUM_FIELD_AS_SPACES
    if stored == unsigned:
        return True
    return stored == sum(struct.unpack_from("148b8x356b", header)) + _CHECKSUM_FIELD_AS_SPACES


def _header_name(header: bytes) -> str:
    name = _cut_at_nul(header[:100])
    # The ustar prefix field only exists under the POSIX magic; GNU headers keep other data there.
    if header[257:263] == b"ustar\0":
        prefix = _cut_at_nul(header[345:500])
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape")


def _parse_pax_records(payload: bytes) -> dict[bytes, bytes]:
    """``"<length> <keyword>=<value>\\n"`` records of a pax extended header, as raw bytes."""
    records = {}
    position = 0
    while position < len(payload) and payload[position] != 0:  # some writers pad the records with NULs
        space = payload.find(b" ", position, position + 21)
        digits = payload[position:space] if space > position else b""
        end = position + int(digits) if digits.isdigit() else position
        if end <= space or end > len(payload) or payload[end - 1] != _NEWLINE:
            raise TarFormatError(f"malformed pax record at byte {position} of an extended header")
        keyword, equals, value = payload[space + 1:end - 1].partition(b"=")
        if not equals:
            raise TarFormatError(f"pax record without '=' at byte {position} of an extended header")
        records[keyword] = value
        position = end
    return records


def _parse_pax_size(value: bytes) -> int:
    if not value.isdigit():
        raise TarFormatError(f"malformed pax size {value!r}")
    return int(value)


def _member_name(header: bytes, long_name: str | None, pax_records: dict[bytes, bytes]) -> str:
    """The pax path when there is one, else the GNU long name, else the header's own (ustar) name."""
    pax_path = pax_records.get(b"path")
    if pax_path:  # an empty value deletes the keyword (POSIX), leaving the header's name in force
        return pax_path.decode("utf-8", "surrogateescape").rstrip("/")
    return long_name if long_name is not None else _header_name(header)


class TarMembers:
    """Walks a tar stream header by header with nothing but ``read(n)``: no seek, no per-member objects.

    ``next_file()`` gives the name and size of the next regular file; ``read_payload()`` then returns its
    bytes (left unread, they are skipped). Directories, links, devices and pax/GNU metadata members are
    consumed on the way; the first all-zero block ends the archive. Anything short or malformed raises
    :class:`TarFormatError`, including a stream that ends without its end-of-archive block, because a cut
    at a member boundary would otherwise pass for a whole shard. Make one with :func:`open_tar_members`.
    """

    def __init__(self, read: Callable[[int], bytes], first_block: bytes) -> None:
        self._read = read
        self._waiting_block = first_block  # read already, to look for compression magic
        self._unread_size = 0
        self._finished = False

    def next_file(self) -> tuple[str, int] | None:
        """(name, size) of the next regular file, or None after the end-of-archive block."""
        if self._finished:
            return None
        read = self._read
        if self._unread_size:
            _skip(read, self._unread_size)
            self._unread_size = 0
        long_name: str | None = None
        pax_records: dict[bytes, bytes] = {}
        while True:
            header = self._waiting_block or _read_exactly(read, BLOCK_SIZE)
            self._waiting_block = b""
            if len(header) != BLOCK_SIZE:
                if not header and long_name is None and not pax_records:
                    raise TarFormatError("the stream ends without the tar end-of-archive block")
                raise TarFormatError("the stream ends inside a tar header")
            if header == _ZERO_BLOCK:
                if long_name is not None or pax_records:
                    raise TarFormatError("an extended header is followed by the end-of-archive block")
                self._finished = True
                return None
            if not _checksum_matches(header):
                raise TarFormatError("bad tar header checksum")
            size = _parse_number(header[124:136])
            member_type = header[156]
            if member_type in _METADATA_TYPES:
                if member_type == _GNU_LONG_NAME:
                    long_name = _cut_at_nul(_read_payload(read, size)).decode("utf-8", "surrogateescape")
                elif member_type in (_GNU_LONG_LINK, _PAX_GLOBAL):
                    _skip(read, size)  # link targets and archive-wide defaults say nothing about file names
                else:
                    pax_records.update(_parse_pax_records(_read_payload(read, size)))
                continue
            if b"size" in pax_records:  # how pax stores sizes beyond the 8 GiB the octal field allows
                size = _parse_pax_size(pax_records[b"size"])
            if member_type in _REGULAR_TYPES:
                if member_type == 0 and _cut_at_nul(header[:100]).endswith(b"/"):
                    pass  # a V7 directory: the old regular type with a trailing slash, no data
                elif pax_records and any(keyword.startswith(b"GNU.sparse.") for keyword in pax_records):
                    _skip(read, size)  # pax-sparse data is a map plus fragments, not the file's bytes
                else:
                    self._unread_size = size
                    return _member_name(header, long_name, pax_records), size
            elif member_type == _GNU_SPARSE:
                extended = header[482]
                while extended:  # old GNU sparse maps continue in whole blocks before the data
                    block = _read_exactly(read, BLOCK_SIZE)
                    if len(block) != BLOCK_SIZE:
                        raise TarFormatError("the stream ends inside a GNU sparse map")
                    extended = block[504]
                _skip(read, size)
            elif member_type not in _TYPES_WITHOUT_DATA:
                _skip(read, size)  # unknown types carry data of the size given (tarfile reads them so too)
            long_name = None
            pax_records = {}

    def read_payload(self) -> bytes:
        """The bytes of the file last returned by :meth:`next_file`."""
        size, self._unread_size = self._unread_size, 0
        return _read_payload(self._read, size) if size else b""


class _PrefixedStream:
    """The bytes read while sniffing for compression, then the rest of the stream, behind ``read(n)``."""

    def __init__(self, prefix: bytes, stream: BinaryIO) -> None:
        self._prefix = prefix
        self._stream = stream

    def read(self, size: int = -1) -> bytes:
        if not self._prefix:
            return self._stream.read(size)
        if size is None or size < 0:
            data, self._prefix = self._prefix + self._stream.read(), b""
            return data
        data, self._prefix = self._prefix[:size], self._prefix[size:]
        return data


def _decompressor(first_block: bytes) -> Callable[[BinaryIO], BinaryIO] | None:
    """The reader for a compressed tar (the magic numbers tarfile's ``r|*`` recognises), None for a plain one."""
    if first_block.startswith(b"\x1f\x8b\x08"):
        return lambda stream: gzip.GzipFile(fileobj=stream, mode="rb")
    if first_block[0:3] == b"BZh" and first_block[4:10] == b"1AY&SY":
        return bz2.BZ2File
    if first_block.startswith((b"\x5d\x00\x00\x80", b"\xfd7zXZ")):
        return lzma.LZMAFile
    return None


def open_tar_members(stream: BinaryIO) -> TarMembers:
    """A :class:`TarMembers` over a plain tar stream, or over its gzip/bzip2/xz decompression."""
    first_block = _read_exactly(stream.read, BLOCK_SIZE)
    decompressor = _decompressor(first_block)
    if decompressor is None:
        return TarMembers(stream.read, first_block)
    decompressed = decompressor(_PrefixedStream(first_block, stream))
    return TarMembers(decompressed.read, _read_exactly(decompressed.read, BLOCK_SIZE))


def iter_tar_members(stream: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """Every regular file of the tar as (name, bytes), in tar order; raises :class:`TarFormatError`."""
    members = open_tar_members(stream)
    while (member := members.next_file()) is not None:
        yield member[0], members.read_payload()


def _key_and_extension(name: str) -> tuple[str, str] | None:
    """:func:`split_member_name`, or None for a hidden basename (``.DS_Store``, ``._x.jpg``)."""
    if "/" in name:  # the common flat name skips the os.path work
        if os.path.basename(name).startswith("."):
            return None
        return split_member_name(name)
    if name.startswith("."):
        return None
    stem, dot, extension = name.partition(".")
    return stem, extension.lower() if dot else ""


def iter_raw_groups(stream: BinaryIO, skipped: Counter) -> Iterator[dict]:
    """Group consecutive members by key into ``{"__key__": key, ext: bytes}`` dicts, in tar order.

    A repeated extension under the same key starts a new group (keys are not always unique across
    concatenated sources, as in LAION); the repeat is counted.
    """
    current: dict | None = None
    try:
        members = open_tar_members(stream)
        while (member := members.next_file()) is not None:
            split = _key_and_extension(member[0])
            if split is None:
                continue
            key, ext = split
            # Decide on the group from the header, before reading data that may be cut short.
            if current is not None and (key != current["__key__"] or ext in current):
                if key == current["__key__"]:
                    skipped[SKIP_DUPLICATE] += 1
                yield current
                current = None
            if current is None:
                current = {"__key__": key}
            current[ext] = members.read_payload()
    except (TarFormatError, EOFError, OSError, ValueError, zlib.error, lzma.LZMAError):
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
