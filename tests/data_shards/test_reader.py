"""ShardReader: exact split over ranks x workers, resume, resampling, broken input, img2dataset shards."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from torch.utils.data import DataLoader

from data_shards import storage
from data_shards.reader import ShardReader, Source
from data_shards.tar_samples import (
    SKIP_BAD_JSON,
    SKIP_NO_IMAGE,
    SKIP_TRUNCATED,
    split_member_name,
)
from tests.data_shards.shard_factory import add_member, jpeg_bytes, write_dataset, write_shard


def keys_of(samples) -> list[str]:
    return [sample["__key__"] for sample in samples]


def test_member_names_split_at_first_dot_of_basename():
    assert split_member_name("a/b.c/000123.0.JPG") == ("a/b.c/000123", "0.jpg")
    assert split_member_name("000123.json") == ("000123", "json")


def test_every_key_exactly_once_across_two_ranks_and_two_workers(tmp_path):
    paths = write_dataset(tmp_path, num_shards=6, per_shard=7)
    pattern = str(tmp_path / "train-{000000..000005}.tar")
    seen = []
    for rank in range(2):
        reader = ShardReader(pattern, rank=rank, world_size=2, num_workers=2, shuffle_buffer=5, seed=3)
        loader = DataLoader(reader, batch_size=None, num_workers=2)
        seen += keys_of(loader)
    expected = [f"s{shard:03d}k{index:04d}" for shard in range(len(paths)) for index in range(7)]
    assert sorted(seen) == sorted(expected)
    assert len(seen) == len(set(seen))


def test_fewer_shards_than_readers_is_a_clear_error(tmp_path):
    write_dataset(tmp_path, num_shards=3, per_shard=2)
    pattern = str(tmp_path / "train-{000000..000002}.tar")
    with pytest.raises(ValueError, match=r"3 shard\(s\) cannot be split over 2 rank\(s\) x 2 loader worker"):
        ShardReader(pattern, rank=0, world_size=2, num_workers=2)
    # resampled mode has no such limit and streams past the data size
    reader = ShardReader(pattern, rank=0, world_size=2, num_workers=2, mode="resampled")
    stream = iter(DataLoader(reader, batch_size=None, num_workers=2))
    assert len([next(stream) for _ in range(20)]) == 20


def test_shuffle_is_seeded_and_not_identity(tmp_path):
    write_dataset(tmp_path, num_shards=2, per_shard=20)
    pattern = str(tmp_path / "train-{000000..000001}.tar")
    first = keys_of(ShardReader(pattern, shuffle_buffer=10, seed=1))
    again = keys_of(ShardReader(pattern, shuffle_buffer=10, seed=1))
    other = keys_of(ShardReader(pattern, shuffle_buffer=10, seed=2))
    assert first == again
    assert first != other
    assert sorted(first) == sorted(other)
    assert first != sorted(first)


@pytest.mark.parametrize("stop_after", [1, 9, 23, 39])
def test_resume_continues_without_repeating_or_skipping(tmp_path, stop_after):
    write_dataset(tmp_path, num_shards=4, per_shard=10)
    pattern = str(tmp_path / "train-{000000..000003}.tar")
    straight = keys_of(ShardReader(pattern, shuffle_buffer=8, seed=5))

    reader = ShardReader(pattern, shuffle_buffer=8, seed=5)
    stream = iter(reader)
    head = [next(stream)["__key__"] for _ in range(stop_after)]
    state = json.loads(json.dumps(reader.state_dict()))  # survives a JSON round trip

    resumed = ShardReader(pattern, shuffle_buffer=8, seed=5)
    resumed.load_state_dict(state)
    tail = keys_of(resumed)
    assert head + tail == straight


def test_resampled_mode_weights_sources(tmp_path):
    write_dataset(tmp_path / "a", num_shards=2, per_shard=5, prefix="a")
    write_dataset(tmp_path / "b", num_shards=2, per_shard=5, prefix="b")
    sources = [Source(str(tmp_path / "a" / "a-{000000..000001}.tar"), weight=3.0),
               Source(str(tmp_path / "b" / "b-{000000..000001}.tar"), weight=1.0)]
    stream = iter(ShardReader(sources, mode="resampled", seed=0))
    urls = Counter("/a/" in next(stream)["__url__"] for _ in range(2000))
    share_a = urls[True] / 2000
    assert 0.68 < share_a < 0.82  # 0.75 expected


def test_weights_need_resampled_mode(tmp_path):
    write_dataset(tmp_path, num_shards=2, per_shard=2)
    with pytest.raises(ValueError, match="mixing weights need mode='resampled'"):
        ShardReader([Source(str(tmp_path / "train-000000.tar"), 2.0), Source(str(tmp_path / "train-000001.tar"))])


def test_broken_members_are_skipped_and_counted(tmp_path):
    good = write_shard(tmp_path / "good-000000.tar", ["g0", "g1"])
    broken = tmp_path / "bad-000000.tar"
    with tarfile.open(broken, "w", format=tarfile.USTAR_FORMAT) as archive:
        add_member(archive, "n0.txt", b"text but no image")
        add_member(archive, "j0.jpg", jpeg_bytes())
        add_member(archive, "j0.json", b"{not json")
        add_member(archive, "ok.jpg", jpeg_bytes())
        add_member(archive, "ok.txt", b"fine")
    truncated = tmp_path / "cut-000000.tar"
    data = good.read_bytes()
    truncated.write_bytes(data[:4300])  # inside the second sample's image
    reader = ShardReader([str(good), str(broken), str(truncated)], shard_shuffle=False)
    keys = keys_of(reader)
    assert keys[:2] == ["g0", "g1"] and "ok" in keys
    assert keys.count("g0") == 2 and "g1" not in keys[2:]  # the cut sample is dropped whole
    assert reader.skipped[SKIP_NO_IMAGE] == 1
    assert reader.skipped[SKIP_BAD_JSON] == 1
    assert reader.skipped[SKIP_TRUNCATED] == 1
    assert reader.state_dict()["skipped"] == dict(reader.skipped)


def test_reads_img2dataset_shards_unchanged(tmp_path):
    path = tmp_path / "00000.tar"
    with tarfile.open(path, "w") as archive:
        for index in range(3):
            key = f"00000{index:04d}"
            meta = {"url": f"http://example.invalid/{index}.jpg", "caption": f"photo {index}", "key": key,
                    "status": "success", "error_message": None, "width": 24, "height": 16,
                    "original_width": 240, "original_height": 160, "exif": "{}", "sha256": "0" * 64}
            add_member(archive, f"{key}.jpg", jpeg_bytes())
            add_member(archive, f"{key}.txt", meta["caption"].encode())
            add_member(archive, f"{key}.json", json.dumps(meta).encode())
    samples = list(ShardReader(str(path)))
    assert keys_of(samples) == ["000000000", "000000001", "000000002"]
    assert samples[1]["txt"] == "photo 1" and samples[1]["json"]["original_width"] == 240
    assert isinstance(samples[0]["jpg"], bytes)


def test_unreachable_shard_names_the_url(tmp_path):
    missing = str(tmp_path / "nope-000000.tar")
    reader = ShardReader(missing, retries=2)
    with pytest.raises(storage.SourceUnreachable, match="nope-000000.tar"):
        list(reader)


def test_pipe_source(tmp_path):
    path = write_shard(tmp_path / "p-000000.tar", ["p0", "p1"])
    assert keys_of(ShardReader(f"pipe:cat {path}")) == ["p0", "p1"]


def test_two_image_members_stay_bytes(tmp_path):
    path = tmp_path / "pair-000000.tar"
    with tarfile.open(path, "w") as archive:
        add_member(archive, "x.0.jpg", jpeg_bytes())
        add_member(archive, "x.1.jpg", jpeg_bytes((0, 0, 255)))
        add_member(archive, "x.txt", b"left is red")
    (sample,) = list(ShardReader(str(path)))
    assert set(sample) >= {"0.jpg", "1.jpg", "txt"} and sample["0.jpg"] != sample["1.jpg"]
    assert io.BytesIO(sample["1.jpg"]).read(2) == b"\xff\xd8"


def test_s3_shards_split_over_ranks_and_resume(tmp_path, s3_bucket):
    paths = write_dataset(tmp_path, num_shards=4, per_shard=5)
    for path in paths:
        with storage.atomic_write(f"s3://{s3_bucket}/data/{path.rsplit('/', 1)[1]}") as sink:
            sink.write(Path(path).read_bytes())
    pattern = f"s3://{s3_bucket}/data/train-{{000000..000003}}.tar"
    seen = [keys_of(ShardReader(pattern, rank=rank, world_size=2, shuffle_buffer=4, seed=1)) for rank in range(2)]
    assert sorted(seen[0] + seen[1]) == sorted(f"s{s:03d}k{i:04d}" for s in range(4) for i in range(5))

    reader = ShardReader(pattern, shuffle_buffer=4, seed=1)
    stream = iter(reader)
    head = [next(stream)["__key__"] for _ in range(7)]
    resumed = ShardReader(pattern, shuffle_buffer=4, seed=1)
    resumed.load_state_dict(reader.state_dict())
    assert head + keys_of(resumed) == keys_of(ShardReader(pattern, shuffle_buffer=4, seed=1))
