"""The streaming tar parser of tar_samples against ``tarfile``: formats, odd members, short reads, broken input.

Run: ``.venv/bin/python -m pytest -q tests/data_shards/test_tar_samples.py``.
"""

from __future__ import annotations

import io
import random
import tarfile
from collections import Counter
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from data_shards.tar_samples import (
    SKIP_DUPLICATE,
    SKIP_TRUNCATED,
    TarFormatError,
    iter_raw_groups,
    iter_tar_members,
)

FORMATS = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}
INTERESTING_SIZES = [0, 1, 100, 511, 512, 513, 1023, 1024, 1536, 3000]


class TrickleStream:
    """A stream whose ``read(n)`` returns at most ``chunk`` bytes, as pipes and S3 bodies may."""

    def __init__(self, data: bytes, chunk: int = 7) -> None:
        self._data = data
        self._position = 0
        self._chunk = chunk

    def read(self, size: int = -1) -> bytes:
        size = self._chunk if size < 0 else min(size, self._chunk)
        piece = self._data[self._position:self._position + size]
        self._position += len(piece)
        return piece


def payload(index: int, size: int) -> bytes:
    return random.Random(index).randbytes(size)


def add_file(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


@dataclass(frozen=True)
class NotAFile:
    """A member without file data: directory, symlink, hard link or FIFO (its tar type flag)."""

    member_type: bytes


DIRECTORY, SYMLINK, HARDLINK = NotAFile(tarfile.DIRTYPE), NotAFile(tarfile.SYMTYPE), NotAFile(tarfile.LNKTYPE)


def write_tar(entries: list[tuple[str, bytes | NotAFile]], tar_format: int = tarfile.GNU_FORMAT,
              mode: str = "w") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode, format=tar_format) as archive:
        for name, content in entries:
            if isinstance(content, bytes):
                add_file(archive, name, content)
                continue
            info = tarfile.TarInfo(name)
            info.type = content.member_type
            if content in (SYMLINK, HARDLINK):
                info.linkname = "x" * 120 + "/target.jpg"  # long enough to need a GNU 'K' or pax linkpath record
            archive.addfile(info)
    return buffer.getvalue()


def tarfile_members(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|*") as archive:
        return [(member.name, archive.extractfile(member).read()) for member in archive if member.isfile()]


def groups(data: bytes, stream=None) -> tuple[list[dict], Counter]:
    skipped: Counter = Counter()
    found = list(iter_raw_groups(stream if stream is not None else io.BytesIO(data), skipped))
    return found, skipped


def with_header_field(data: bytes, header_offset: int, start: int, field: bytes) -> bytes:
    """``data`` with bytes [start, start+len(field)) of the header at ``header_offset`` replaced, checksum redone."""
    header = bytearray(data[header_offset:header_offset + 512])
    header[start:start + len(field)] = field
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return data[:header_offset] + bytes(header) + data[header_offset + 512:]


segment = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-é", min_size=1, max_size=40)
member_names = st.lists(segment, min_size=1, max_size=5).map("/".join)
member_entries = st.lists(
    st.tuples(member_names, st.one_of(st.sampled_from(INTERESTING_SIZES), st.integers(0, 5000)),
              st.sampled_from(["file", "file", "file", "dir", "symlink", "hardlink"])),
    min_size=0, max_size=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entries=member_entries, format_name=st.sampled_from(sorted(FORMATS)), chunk=st.sampled_from([7, 512, 1 << 20]))
def test_members_match_tarfile_in_every_format(entries, format_name, chunk):
    kinds = {"dir": DIRECTORY, "symlink": SYMLINK, "hardlink": HARDLINK}
    listing = [(name, payload(index, size) if kind == "file" else kinds[kind])
               for index, (name, size, kind) in enumerate(entries)]
    try:
        data = write_tar(listing, FORMATS[format_name])
    except ValueError:  # ustar cannot split every long name over its prefix and name fields
        assume(False)
    expected = tarfile_members(data)
    assert list(iter_tar_members(TrickleStream(data, chunk))) == expected
    assert len(expected) == sum(kind == "file" for _, _, kind in entries)


def test_long_names_use_each_formats_own_mechanism():
    long_name = "/".join(["directory-with-a-long-name"] * 6) + "/000001.jpg"
    assert len(long_name) > 155
    formats = [(tarfile.GNU_FORMAT, b"L"), (tarfile.PAX_FORMAT, b"x"), (tarfile.USTAR_FORMAT, b"0")]
    for tar_format, first_type in formats:
        data = write_tar([(long_name, b"image"), ("short.txt", b"text")], tar_format)
        assert data[156:157] == first_type
        if tar_format == tarfile.USTAR_FORMAT:  # split over the prefix and name fields
            prefix, name = data[345:500].rstrip(b"\0"), data[:100].rstrip(b"\0")
            assert prefix and name and prefix + b"/" + name == long_name.encode()
        assert list(iter_tar_members(io.BytesIO(data))) == [(long_name, b"image"), ("short.txt", b"text")]


def test_pax_records_override_name_and_size_and_global_headers_are_skipped():
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT,
                      pax_headers={"comment": "archive-wide"}) as archive:
        info = tarfile.TarInfo("placeholder.bin")
        info.size = 700
        info.pax_headers = {"path": "real/name.jpg", "size": "700"}
        archive.addfile(info, io.BytesIO(payload(1, 700)))
        add_file(archive, "next.txt", b"after")
    data = buffer.getvalue()
    assert data[156:157] == tarfile.XGLTYPE
    # the ustar size field says 0 while the pax record says 700: the record wins, as in tarfile
    file_header = data.index(b"placeholder.bin")
    data = with_header_field(data, file_header, 124, b"%011o\0" % 0)
    expected = [("real/name.jpg", payload(1, 700)), ("next.txt", b"after")]
    assert tarfile_members(data) == expected
    assert list(iter_tar_members(io.BytesIO(data))) == expected


def test_base256_size_field():
    data = write_tar([("big.bin", payload(2, 700)), ("after.txt", b"x")], tarfile.GNU_FORMAT)
    data = with_header_field(data, 0, 124, b"\x80" + (700).to_bytes(11, "big"))
    assert tarfile_members(data) == [("big.bin", payload(2, 700)), ("after.txt", b"x")]
    assert list(iter_tar_members(io.BytesIO(data))) == tarfile_members(data)


def test_typeflags_nul_and_contiguous_are_files_others_skipped_with_or_without_data():
    data = write_tar([("a.jpg", b"one"), ("b.jpg", b"two"), ("c.jpg", b"three"), ("d.jpg", b"four!"),
                      ("e.jpg", b"five")], tarfile.USTAR_FORMAT)
    data = with_header_field(data, 0, 156, b"\0")  # old regular file
    data = with_header_field(data, 1024, 156, b"7")  # contiguous file
    data = with_header_field(data, 2048, 156, b"V")  # unknown type: its data is skipped
    # a directory whose size field is non-zero still has no data blocks (the size is only a hint)
    directory = write_tar([("dir", DIRECTORY)], tarfile.USTAR_FORMAT)[:512]
    directory = with_header_field(directory, 0, 124, b"%011o\0" % 4096)
    v7_directory = with_header_field(directory, 0, 0, b"old-dir/\0")
    v7_directory = with_header_field(v7_directory, 0, 156, b"\0")
    data = data[:3072] + directory + v7_directory + data[3072:]
    expected = [("a.jpg", b"one"), ("b.jpg", b"two"), ("d.jpg", b"four!"), ("e.jpg", b"five")]
    assert tarfile_members(data) == expected
    assert list(iter_tar_members(io.BytesIO(data))) == expected


def test_old_gnu_sparse_member_is_skipped_with_its_map_blocks():
    data = write_tar([("sparse.bin", payload(3, 512)), ("after.jpg", b"kept")], tarfile.GNU_FORMAT)
    data = with_header_field(data, 0, 156, b"S")
    data = with_header_field(data, 0, 482, b"\x01")  # one extension block of sparse map follows the header
    extension = bytearray(512)
    data = data[:512] + bytes(extension) + data[512:]
    assert list(iter_tar_members(io.BytesIO(data))) == [("after.jpg", b"kept")]


def test_groups_by_key_skip_hidden_and_split_on_repeated_extension():
    data = write_tar([("dir", DIRECTORY), ("dir/k1.jpg", b"i1"), ("dir/k1.TXT", b"t1"), ("dir/.k1.json", b"{}"),
                      ("._k2.jpg", b"mac"), ("k2.jpg", b"i2"), ("link.jpg", SYMLINK), ("k2.jpg", b"i2bis"),
                      ("k3.0.jpg", b"a"), ("k3.1.jpg", b"b")])
    found, skipped = groups(data, TrickleStream(data))
    assert found == [{"__key__": "dir/k1", "jpg": b"i1", "txt": b"t1"}, {"__key__": "k2", "jpg": b"i2"},
                     {"__key__": "k2", "jpg": b"i2bis"}, {"__key__": "k3", "0.jpg": b"a", "1.jpg": b"b"}]
    assert skipped == Counter({SKIP_DUPLICATE: 1})


def sample_shard() -> tuple[bytes, list[int], int]:
    """A GNU tar of 3 samples (one with a long name, one followed by a directory), the offset where each
    group's first file header ends, and the offset where the members end (the end-of-archive block)."""
    keys = ["k0", "k1-" + "n" * 120, "k2"]
    entries: list[tuple[str, bytes | NotAFile]] = []
    for index, key in enumerate(keys):
        entries += [(f"{key}.jpg", payload(index, 700)), (f"{key}.txt", b"caption"), (f"{key}.json", b"")]
        if index == 0:
            entries.append(("dir", DIRECTORY))
    data = write_tar(entries, tarfile.GNU_FORMAT)
    first_header_ends = []
    offset = 0
    for name, content in entries:
        offset += 512 * 3 if len(name) > 100 else 512  # a long name adds an 'L' header and its one data block
        if name.endswith(".jpg"):
            first_header_ends.append(offset)
        offset += -(-len(content) // 512) * 512 if isinstance(content, bytes) else 0
    return data, first_header_ends, offset


def test_sample_shard_layout_is_what_the_truncation_test_assumes():
    data, first_header_ends, members_end = sample_shard()
    assert data[members_end:members_end + 1024] == bytes(1024) and data[members_end - 512:members_end] != bytes(512)
    header_names = [data[end - 512:end].split(b"\0")[0][:3] for end in first_header_ends]
    assert header_names == [b"k0.", b"k1-", b"k2."]
    assert data[first_header_ends[1] - 1536:first_header_ends[1] - 1536 + 13] == b"././@LongLink"
    found, skipped = groups(data)
    assert [group["__key__"][:3] for group in found] == ["k0", "k1-", "k2"] and not skipped


def test_truncation_at_every_byte_stops_the_shard_and_drops_the_partial_sample():
    data, first_header_ends, members_end = sample_shard()
    whole, _ = groups(data)
    # a group is known complete once the next group's first header, or the end-of-archive block, is read
    group_ends = first_header_ends[1:] + [members_end + 512]
    for cut in range(len(data)):
        stream = TrickleStream(data[:cut], 7 if cut % 31 == 0 else 1 << 20)
        found, skipped = groups(data[:cut], stream)
        complete = sum(end <= cut for end in group_ends)
        assert found == whole[:complete], cut
        assert skipped == (Counter({SKIP_TRUNCATED: 1}) if cut < members_end + 512 else Counter()), cut


def test_missing_end_blocks_and_empty_stream_are_named_errors():
    data, _, members_end = sample_shard()
    with pytest.raises(TarFormatError, match="the stream ends without the tar end-of-archive block"):
        list(iter_tar_members(io.BytesIO(data[:members_end])))
    with pytest.raises(TarFormatError, match="the stream ends without the tar end-of-archive block"):
        list(iter_tar_members(io.BytesIO(b"")))
    with pytest.raises(TarFormatError, match="the stream ends inside a 700-byte member"):
        list(iter_tar_members(io.BytesIO(data[:1000])))
    assert list(iter_tar_members(io.BytesIO(bytes(1024)))) == []


def test_corrupt_headers_stop_the_shard():
    data = write_tar([("k0.jpg", b"a"), ("k0.txt", b"b"), ("k1.jpg", b"c"), ("k1.txt", b"d")], tarfile.USTAR_FORMAT)
    flipped = data[:1024] + b"j" + data[1025:]  # k0.txt's header renamed, its checksum left as it was
    with pytest.raises(TarFormatError, match="bad tar header checksum"):
        list(iter_tar_members(io.BytesIO(flipped)))
    found, skipped = groups(flipped)
    assert found == [] and skipped == Counter({SKIP_TRUNCATED: 1})  # k0 had lost its txt: dropped
    broken_field = with_header_field(data, 2048, 124, b"0000000z000\0")
    found, skipped = groups(broken_field)
    # k0 may have had more members after k0.txt: with the next header unreadable it cannot be known whole
    assert found == [] and skipped == Counter({SKIP_TRUNCATED: 1})
    with pytest.raises(TarFormatError, match=r"malformed octal number b'0000000z000' in a tar header"):
        list(iter_tar_members(io.BytesIO(broken_field)))


def test_signed_checksum_of_old_writers_is_accepted():
    data = write_tar([("caf\u00e9.jpg", b"a")], tarfile.USTAR_FORMAT)  # the name holds bytes >= 128
    header = bytearray(data[:512])
    header[148:156] = b" " * 8
    signed = sum(byte - 256 if byte > 127 else byte for byte in header)
    assert signed != sum(header)
    header[148:156] = b"%06o\0 " % signed
    assert list(iter_tar_members(io.BytesIO(bytes(header) + data[512:]))) == [("caf\u00e9.jpg", b"a")]


def test_broken_extended_headers_stop_the_shard():
    data = write_tar([("p" * 150 + ".jpg", b"a")], tarfile.PAX_FORMAT)
    assert data[156:157] == tarfile.XHDTYPE
    with pytest.raises(TarFormatError, match="malformed pax record at byte 0"):
        list(iter_tar_members(io.BytesIO(data[:512] + b"9" + data[513:])))
    only_metadata = data[:1024] + bytes(1024)  # the pax header, then the end of the archive
    with pytest.raises(TarFormatError, match="an extended header is followed by the end-of-archive block"):
        list(iter_tar_members(io.BytesIO(only_metadata)))


@pytest.mark.parametrize("mode", ["w:gz", "w:bz2", "w:xz"])
def test_compressed_tars_read_like_plain_ones(mode):
    entries = [(f"k{index}.{ext}", payload(index, size)) for index in range(4)
               for ext, size in [("jpg", 900), ("txt", 12)]]
    plain = write_tar(entries)
    compressed = write_tar(entries, mode=mode)
    assert compressed[:4] != plain[:4]
    assert groups(compressed, TrickleStream(compressed)) == groups(plain)
    found, skipped = groups(compressed[:len(compressed) // 2])
    assert skipped == Counter({SKIP_TRUNCATED: 1}) and found == groups(plain)[0][:len(found)]


def test_corrupt_gzip_data_is_counted_not_raised():
    entries = [(f"k{index}.jpg", b"compressible " * 300) for index in range(6)]
    compressed = bytearray(write_tar(entries, mode="w:gz"))
    deflate_start = 10
    if compressed[3] & 0x08:  # FNAME: a NUL-terminated file name precedes the deflate data
        deflate_start = compressed.index(0, 10) + 1
    compressed[deflate_start] |= 0x06  # block type 3 is reserved: zlib refuses the stream
    found, skipped = groups(bytes(compressed))
    assert found == [] and skipped == Counter({SKIP_TRUNCATED: 1})
