"""Tests for data_shards.storage: URL expansion, local/S3 round trips, atomic writes, retries, hdfs/pipe.

Run: ``.venv/bin/python -m pytest -q tests/data_shards/test_storage.py`` (S3 tests use a moto server).
"""

from __future__ import annotations

import io
import os
import socket
import stat
import tarfile
import time

import boto3
import pytest

from data_shards import storage

MiB = 1024 * 1024


class Boom(RuntimeError):
    pass


def small_tar(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_expand_urls_braces_and_lists_keep_order():
    assert storage.expand_urls("a-{000..002}.tar::b.tar") == ["a-000.tar", "a-001.tar", "a-002.tar", "b.tar"]
    assert storage.expand_urls(["s3://x/{1..2}.tar", "c.tar"]) == ["s3://x/1.tar", "s3://x/2.tar", "c.tar"]
    assert storage.expand_urls("pipe:cat z.tar") == ["pipe:cat z.tar"]
    assert len(storage.expand_urls("p-{000000..000015}.tar")) == 16


def test_join_and_parent():
    assert storage.join("s3://bucket/prefix/", "a.tar") == "s3://bucket/prefix/a.tar"
    assert storage.join("out", "a.tar") == os.path.join("out", "a.tar")
    assert storage.parent("s3://bucket/prefix/x-000000.tar") == "s3://bucket/prefix"
    assert storage.parent("s3://bucket/x.tar") == "s3://bucket"
    assert storage.parent("/data/shards/x.tar") == "/data/shards"
    assert storage.parent("x.tar") == "."
    with pytest.raises(ValueError, match="unsupported URL scheme in 'gs://b/x': use a local path"):
        storage.exists("gs://b/x")


def test_local_round_trip_and_listing(tmp_path):
    target = str(tmp_path / "sub" / "data.bin")
    with storage.atomic_write(target) as sink:
        sink.write(b"hello ")
        assert sink.tell() == 6
        sink.write(b"world")
    assert storage.read_bytes(target) == b"hello world"
    assert storage.read_bytes("file://" + target) == b"hello world"
    assert storage.exists(target) and not storage.exists(target + ".missing")
    assert storage.size(target) == 11
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o644
    assert storage.list_dir(str(tmp_path / "sub")) == [target]


def test_local_atomic_write_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out.tar"
    target.write_bytes(b"old complete file")
    with pytest.raises(Boom), storage.atomic_write(str(target)) as sink:
        sink.write(b"partial")
        assert len(os.listdir(tmp_path)) == 2  # the target and one hidden temporary
        raise Boom()
    assert os.listdir(tmp_path) == ["out.tar"]
    assert target.read_bytes() == b"old complete file"


def test_discard_partial_writes_local(tmp_path):
    for name in (".x.tar.abc123.partial", ".x.idx.q_9.partial", ".y.tar.abc123.partial", ".x.tar.keep"):
        (tmp_path / name).write_bytes(b"left by a killed run")
    assert storage.discard_partial_writes(str(tmp_path), ["x.tar", "x.idx", "z.json"]) == 2
    assert sorted(os.listdir(tmp_path)) == [".x.tar.keep", ".y.tar.abc123.partial"]
    assert storage.discard_partial_writes(str(tmp_path / "absent"), ["x.tar"]) == 0


def test_local_stream_reads_as_streaming_tar(tmp_path):
    path = tmp_path / "a.tar"
    path.write_bytes(small_tar({"k.jpg": b"\xff\xd8data", "k.txt": b"caption"}))
    with storage.open_read(str(path)) as stream, tarfile.open(fileobj=stream, mode="r|") as archive:
        assert [(member.name, archive.extractfile(member).read()) for member in archive] == [
            ("k.jpg", b"\xff\xd8data"), ("k.txt", b"caption")]


def test_missing_local_file_is_retried_then_named(tmp_path):
    missing = str(tmp_path / "nope.tar")
    with pytest.raises(storage.SourceUnreachable) as caught:
        storage.open_read(missing, retries=2, backoff=0.01)
    assert str(caught.value).startswith(f"could not open {missing} after 2 attempts: [Errno 2]")
    assert isinstance(caught.value, OSError)


def test_pipe_retries_with_backoff_then_raises(tmp_path):
    attempts = tmp_path / "attempts"
    url = f"pipe:echo try >> {attempts}; echo 'bad credentials' >&2; exit 3"
    started = time.monotonic()
    with pytest.raises(storage.SourceUnreachable) as caught:
        storage.open_read(url, retries=3, backoff=0.1)
    assert time.monotonic() - started >= 0.1 + 0.2  # two waits, doubling
    assert attempts.read_text() == "try\n" * 3
    assert str(caught.value) == (f"could not open {url} after 3 attempts: reading {url}: "
                                 "command exited with status 3: bad credentials")


def test_pipe_streams_stdout_and_reports_late_failure(tmp_path):
    path = tmp_path / "a.tar"
    path.write_bytes(small_tar({"k.txt": b"x" * 3000}))
    with storage.open_read(f"pipe:cat {path}") as stream, tarfile.open(fileobj=stream, mode="r|") as archive:
        assert [member.name for member in archive] == ["k.txt"]
    failing = "pipe:printf abc; exit 1"
    expected = f"^reading {failing}: command exited with status 1: $"
    with storage.open_read(failing) as stream, pytest.raises(OSError, match=expected):
        stream.read()


def test_pipe_closed_early_stops_the_command():
    started = time.monotonic()
    with storage.open_read("pipe:yes") as stream:
        assert stream.read(4) == b"y\ny\n"
    assert time.monotonic() - started < 5


def test_hdfs_through_configured_client_command(tmp_path):
    # A stand-in for `hdfs dfs -cat URL`: maps hdfs://namenode/PATH to a local file under tmp_path.
    client = tmp_path / "fake-hdfs"
    client.write_text('#!/bin/sh\n[ "$1 $2" = "dfs -cat" ] || exit 9\n'
                      f'exec cat "{tmp_path}/${{3#hdfs://namenode/}}"\n')
    client.chmod(0o755)
    (tmp_path / "shard.tar").write_bytes(small_tar({"k.txt": b"from hdfs"}))
    command = f"{client} dfs -cat"
    assert storage.read_bytes("hdfs://namenode/shard.tar", hdfs_command=command)[:5] == b"k.txt"
    with pytest.raises(storage.SourceUnreachable) as caught:
        storage.open_read("hdfs://namenode/missing.tar", retries=1, hdfs_command=command)
    message = str(caught.value)
    assert message.startswith("could not open hdfs://namenode/missing.tar after 1 attempts: reading "
                              "hdfs://namenode/missing.tar: command exited with status 1: cat:")
    assert "No such file or directory" in message


def test_s3_small_round_trip_listing_and_streaming(s3_bucket):
    url = f"s3://{s3_bucket}/shards/a.tar"
    payload = small_tar({"k.jpg": b"image", "k.json": b"{}"})
    with storage.atomic_write(url) as sink:
        sink.write(payload)
    assert storage.exists(url) and not storage.exists(url + ".idx")
    assert storage.size(url) == len(payload)
    assert storage.read_bytes(url) == payload
    with storage.open_read(url) as stream, tarfile.open(fileobj=stream, mode="r|") as archive:
        assert [member.name for member in archive] == ["k.jpg", "k.json"]
    with storage.atomic_write(f"s3://{s3_bucket}/shards/sub/b.txt") as sink:
        sink.write(b"b")
    assert storage.list_dir(f"s3://{s3_bucket}/shards") == [url, f"s3://{s3_bucket}/shards/sub"]


def test_s3_large_write_goes_through_several_parts(s3_bucket):
    url = f"s3://{s3_bucket}/big.bin"
    payload = bytes(range(256)) * (11 * MiB // 256) + b"tail"
    with storage.atomic_write(url, part_bytes=5 * MiB) as sink:
        for start in range(0, len(payload), 3 * MiB):
            sink.write(memoryview(payload)[start:start + 3 * MiB])
        assert sink.tell() == len(payload)
    head = boto3.client("s3").head_object(Bucket=s3_bucket, Key="big.bin")
    assert head["ETag"].strip('"').endswith("-3")  # multipart ETags end in -<number of parts>
    assert storage.read_bytes(url) == payload


@pytest.mark.parametrize("written", [100, 6 * MiB])
def test_s3_atomic_write_error_leaves_no_object_and_no_upload(s3_bucket, written):
    url = f"s3://{s3_bucket}/partial.tar"
    with pytest.raises(Boom), storage.atomic_write(url, part_bytes=5 * MiB) as sink:
        sink.write(b"x" * written)
        raise Boom()
    client = boto3.client("s3")
    assert client.list_objects_v2(Bucket=s3_bucket).get("KeyCount") == 0
    assert client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    assert not storage.exists(url)


def test_s3_parts_below_the_minimum_are_refused(s3_bucket):
    with pytest.raises(ValueError, match="S3 parts must be at least 5242880 bytes"), \
            storage.atomic_write(f"s3://{s3_bucket}/x", part_bytes=MiB):
        pass


def test_s3_discard_partial_writes_aborts_stale_uploads(s3_bucket):
    client = boto3.client("s3")
    for key in ("out/a.tar", "out/a.idx", "out/a.tar.other", "other/a.tar"):
        client.create_multipart_upload(Bucket=s3_bucket, Key=key)
    assert storage.discard_partial_writes(f"s3://{s3_bucket}/out", ["a.tar", "a.idx"]) == 2
    left = sorted(upload["Key"] for upload in client.list_multipart_uploads(Bucket=s3_bucket)["Uploads"])
    assert left == ["other/a.tar", "out/a.tar.other"]


def test_s3_missing_object_is_named(s3_bucket):
    url = f"s3://{s3_bucket}/missing.tar"
    expected = f"could not open {url} after 2 attempts: .*NoSuchKey"
    with pytest.raises(storage.SourceUnreachable, match=expected):
        storage.open_read(url, retries=2, backoff=0.01)


def test_s3_unreachable_endpoint_is_retried_then_named(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{unused_port()}")
    started = time.monotonic()
    with pytest.raises(storage.SourceUnreachable) as caught:
        storage.open_read("s3://bucket/key.tar", retries=3, backoff=0.05)
    assert time.monotonic() - started < 10
    assert str(caught.value).startswith("could not open s3://bucket/key.tar after 3 attempts: "
                                        "Could not connect to the endpoint URL")
