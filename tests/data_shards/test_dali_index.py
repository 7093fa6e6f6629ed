"""Tests for data_shards.dali_index: byte-identical to DALI's ``wds2idx``, offsets, DALI CPU reading.

Run: ``.venv/bin/python -m pytest -q tests/data_shards/test_dali_index.py``.
"""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from data_shards import dali_index, storage
from data_shards.dali_index import IndexedTarWriter, IndexEntry

WDS2IDX = Path(sys.executable).parent / "wds2idx"

SAMPLES = [
    ("000000000", [("jpg", b"\xff\xd8" + b"a" * 1000), ("json", b'{"width": 4}'), ("txt", b"a red circle")]),
    # two images: the extension is everything after the first dot of the member name
    ("000000001", [("0.jpg", b"b" * 512), ("1.jpg", b"c" * 513), ("json", b"{}"), ("txt", b"two")]),
    ("000000002", [("json", b"{}"), ("png", b"\x89PNG" + b"d" * 20), ("txt", b"")]),
    ("000000003", [("0.webp", b"RIFF"), ("1.png", b"\x89PNG"), ("txt", b"mixed")]),
]


def written_tar(samples=SAMPLES) -> tuple[bytes, list[IndexEntry]]:
    sink = io.BytesIO()
    writer = IndexedTarWriter(sink)
    for key, members in samples:
        writer.add_sample(key, members)
    writer.close()
    return sink.getvalue(), writer.entries


def reference_index(tar_path: Path) -> str:
    """The index the installed DALI tool writes for this tar."""
    index_path = tar_path.with_suffix(".reference.idx")
    subprocess.run([str(WDS2IDX), str(tar_path), str(index_path)], check=True, capture_output=True)
    return index_path.read_text()


def test_split_name_matches_wds2idx():
    from wds2idx import IndexCreator

    for name in ["k.jpg", "k.0.jpg", "dir/k.tar.gz", "d.x/k.json", "noext", ".hidden", "dir/.h.txt", "a/b/c"]:
        assert dali_index.split_name(name) == IndexCreator.split_name(name), name


def test_writer_index_is_byte_identical_to_wds2idx(tmp_path):
    data, entries = written_tar()
    path = tmp_path / "shard-000000.tar"
    path.write_bytes(data)
    expected = reference_index(path)
    assert dali_index.index_from_members(entries) == expected
    assert dali_index.index_from_tar(str(path)) == expected
    assert dali_index.index_from_tar(data) == expected
    # sample 0 spans 7 blocks (1002 data bytes take two), so sample 1's first header is block 7
    assert expected.splitlines()[2] == ("0.jpg 4096 512 000000001.0.jpg 1.jpg 5120 513 000000001.1.jpg "
                                        "json 6656 2 000000001.json txt 7680 3 000000001.txt")


def test_offsets_point_at_member_data():
    data, entries = written_tar()
    members = [member for _, sample in SAMPLES for member in sample]
    assert [entry.name.split(".", 1)[1] for entry in entries] == [extension for extension, _ in members]
    for entry, (_, payload) in zip(entries, members, strict=True):
        assert entry.data_offset % 512 == 0
        assert data[entry.data_offset: entry.data_offset + entry.size] == payload


def test_writer_is_reproducible_with_fixed_metadata():
    first, _ = written_tar()
    second, _ = written_tar()
    assert first == second
    with tarfile.open(fileobj=io.BytesIO(first)) as archive:
        member = archive.getmembers()[0]
    assert (member.mtime, member.uid, member.gid, member.uname, member.mode) == (0, 0, 0, "", 0o644)


def test_foreign_tar_with_hidden_dirs_and_split_keys_matches_wds2idx(tmp_path):
    path = tmp_path / "foreign.tar"
    with tarfile.open(path, "w") as archive:  # default (pax) format, as other tools write
        members = [("images", None), ("images/k1.jpg", b"x" * 700), ("images/k1.txt", b"t"),
                   (".hidden", b"h"), ("k2.txt", b"y"), ("images/k1.json", b"{}"), ("noext", b"n")]
        for name, payload in members:
            info = tarfile.TarInfo(name)
            if payload is None:
                info.type = tarfile.DIRTYPE
                archive.addfile(info)
                continue
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    expected = reference_index(path)
    assert dali_index.index_from_tar(str(path)) == expected
    assert expected.splitlines()[0] == "v1.2 4"  # k1 is split in two because k2 comes between its members


def test_empty_tar_is_refused_like_dali(tmp_path):
    data, entries = written_tar([])
    with pytest.raises(ValueError, match="no samples to index"):
        dali_index.index_from_tar(data)
    path = tmp_path / "empty.tar"
    path.write_bytes(data)
    failed = subprocess.run([str(WDS2IDX), str(path)], capture_output=True, text=True)
    assert failed.returncode != 0 and "Webdataset Tar File empty" in failed.stderr


def test_parse_index_round_trip_and_errors():
    _, entries = written_tar()
    parsed = dali_index.parse_index(dali_index.index_from_members(entries))
    assert [component for sample in parsed for component in sample] == entries
    assert [len(sample) for sample in parsed] == [3, 4, 3, 3]
    with pytest.raises(ValueError, match="index declares 2 samples but lists 1"):
        dali_index.parse_index("v1.2 2\njpg 512 3 k.jpg\n")
    with pytest.raises(ValueError, match="not a v1.2 DALI index"):
        dali_index.parse_index("v1.1 1\njpg 512 3\n")


def test_index_url_and_write_index_local_and_s3(tmp_path, s3_bucket):
    assert dali_index.index_url_for("s3://b/p/train.v2-000001.tar") == "s3://b/p/train.v2-000001.idx"
    with pytest.raises(ValueError, match="must end in .tar"):
        dali_index.index_url_for("x.tgz")
    data, entries = written_tar()
    expected = dali_index.index_from_members(entries)
    local = tmp_path / "a-000000.tar"
    local.write_bytes(data)
    assert dali_index.write_index(str(local)) == str(tmp_path / "a-000000.idx")
    assert (tmp_path / "a-000000.idx").read_text() == expected
    remote = f"s3://{s3_bucket}/shards/a-000000.tar"
    with storage.atomic_write(remote) as sink:
        sink.write(data)
    assert dali_index.write_index(remote) == f"s3://{s3_bucket}/shards/a-000000.idx"
    assert storage.read_bytes(f"s3://{s3_bucket}/shards/a-000000.idx").decode() == expected


def test_dali_cpu_reader_reads_our_index(tmp_path):
    pipeline_module = pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn

    data, entries = written_tar()
    tar_path, index_path = tmp_path / "s-000000.tar", tmp_path / "s-000000.idx"
    tar_path.write_bytes(data)
    index_path.write_text(dali_index.index_from_members(entries))

    @pipeline_module.pipeline_def(batch_size=len(SAMPLES), num_threads=1, device_id=None)
    def read_shard():
        images, texts = fn.readers.webdataset(
            paths=[str(tar_path)], index_paths=[str(index_path)], ext=["jpg;0.jpg;png;0.webp", "txt"],
            missing_component_behavior="error")
        return images, texts

    pipeline = read_shard()
    pipeline.build()
    images, texts = pipeline.run()
    with tarfile.open(tar_path, mode="r|") as archive:
        expected = {member.name: archive.extractfile(member).read() for member in archive}
    first_image = ["000000000.jpg", "000000001.0.jpg", "000000002.png", "000000003.0.webp"]
    assert [images.at(index).tobytes() for index in range(len(SAMPLES))] == [
        expected[name] for name in first_image]
    assert [texts.at(index).tobytes() for index in range(len(SAMPLES))] == [
        expected[f"{key}.txt"] for key, _ in SAMPLES]
