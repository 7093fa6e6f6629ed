"""Opening, listing and atomically writing URLs: local paths, ``file://``, ``s3://``, ``hdfs://``, ``pipe:``.

Every other module reaches storage through these functions, so a new scheme is added here once::

    for url in expand_urls("s3://bucket/train-{000000..000015}.tar::data/extra-000000.tar"):
        with open_read(url) as stream:            # retried, then SourceUnreachable naming the URL
            ...
    with atomic_write("s3://bucket/out/manifest.json") as sink:   # visible only once complete
        sink.write(b"{}")

S3 uses boto3 with its standard configuration (``AWS_ENDPOINT_URL`` selects an S3-compatible store).
HDFS goes through a configurable client command (``hdfs dfs -cat`` by default) whose stdout is streamed;
``pipe:COMMAND`` runs a shell command taken from configuration, never from data: a location that came
from data (an annotation's image path) is opened with ``open_data_read``/``read_data_bytes``, which refuse
``pipe:``.
"""

from __future__ import annotations

import functools
import io
import os
import shlex
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import BinaryIO

import braceexpand

S3_MINIMUM_PART_BYTES = 5 * 1024 * 1024
DEFAULT_PART_BYTES = 8 * 1024 * 1024
READ_BUFFER_BYTES = 1024 * 1024
PARTIAL_SUFFIX = ".partial"
_S3_NOT_FOUND_CODES = ("404", "NoSuchKey", "NotFound", "NoSuchBucket")


class SourceUnreachable(OSError):
    """A URL could not be opened after every retry; the message names the URL and the last error."""


class SourceNotFound(SourceUnreachable):
    """The URL names nothing (no such file, S3 key or bucket): every retry ended in "not found"."""


def expand_urls(spec: str | Sequence[str]) -> list[str]:
    """``a::b`` lists and brace patterns (``x-{000000..000015}.tar``) into a flat list, order kept."""
    parts = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for part in parts:
        for piece in part.split("::"):
            piece = piece.strip()
            if piece:
                urls.extend(braceexpand.braceexpand(piece))
    return urls


def scheme(url: str) -> str:
    """``local`` (paths and ``file://``), ``s3``, ``hdfs`` or ``pipe``; any other scheme is a ValueError."""
    return _scheme(url)


def _scheme(url: str) -> str:
    if url.startswith("pipe:"):
        return "pipe"
    if url.startswith("s3://"):
        return "s3"
    if url.startswith("hdfs://"):
        return "hdfs"
    if "://" in url and not url.startswith("file://"):
        raise ValueError(f"unsupported URL scheme in {url!r}: use a local path, file://, s3://, hdfs:// "
                         "or pipe:")
    return "local"


def _local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def _split_s3(url: str) -> tuple[str, str]:
    bucket, _, key = url[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"no bucket in S3 URL {url!r}; write s3://BUCKET/KEY")
    return bucket, key


def s3_client(max_attempts: int = 3):
    """The boto3 S3 client of this process; rebuilt after a fork or when the AWS variables change."""
    watched = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION",
               "AWS_ACCESS_KEY_ID", "AWS_PROFILE")
    environment = tuple(os.environ.get(name) for name in watched)
    return _cached_s3_client(os.getpid(), environment, max_attempts)


@functools.lru_cache(maxsize=8)
def _cached_s3_client(process_id: int, environment: tuple, max_attempts: int):
    # process_id and environment only key the cache: boto3 clients must not cross a fork, and tests
    # point AWS_ENDPOINT_URL at a fresh server.
    import boto3
    from botocore.config import Config

    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    config = Config(retries={"mode": "standard", "total_max_attempts": max_attempts},
                    connect_timeout=10, read_timeout=60)
    return boto3.session.Session().client("s3", region_name=region, config=config)


class _StreamReader(io.RawIOBase):
    """Raw readable stream over a ``read(n)`` callable; close runs the owner's cleanup."""

    def __init__(self, read, cleanup) -> None:
        super().__init__()
        self._read = read
        self._cleanup = cleanup

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            try:
                self._cleanup()
            finally:
                super().close()


class _CommandOutput:
    """stdout of a client command; a non-zero exit at end of stream is an error naming the URL."""

    def __init__(self, command: list[str] | str, url: str) -> None:
        self.url = url
        # A file, not a pipe, so a chatty client cannot block on it; closed in cleanup().
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115
        try:
            self._process = subprocess.Popen(command, shell=isinstance(command, str), stdout=subprocess.PIPE,
                                             stderr=self._stderr, bufsize=0, start_new_session=True)
        except BaseException:
            self._stderr.close()
            raise

    def read(self, size: int) -> bytes:
        data = self._process.stdout.read(size)
        if not data and size:
            status = self._process.wait()
            if status != 0:
                self._stderr.seek(0)
                message = self._stderr.read()[-2000:].decode(errors="replace").strip()
                raise OSError(f"reading {self.url}: command exited with status {status}: {message}")
        return data

    def cleanup(self) -> None:
        if self._process.poll() is None:
            # The reader stopped early (or gave up): stop the whole command, shell children included.
            with suppress(ProcessLookupError):
                os.killpg(self._process.pid, signal.SIGKILL)
        self._process.stdout.close()
        self._process.wait()
        self._stderr.close()


def _open_once(url: str, hdfs_command: str, client) -> BinaryIO:
    scheme = _scheme(url)
    if scheme == "local":
        return open(_local_path(url), "rb")
    if scheme == "s3":
        bucket, key = _split_s3(url)
        body = client.get_object(Bucket=bucket, Key=key)["Body"]
        return io.BufferedReader(_StreamReader(body.read, body.close), READ_BUFFER_BYTES)
    if scheme == "hdfs":
        output = _CommandOutput([*shlex.split(hdfs_command), url], url)
    else:
        output = _CommandOutput(url[len("pipe:"):], url)
    stream = io.BufferedReader(_StreamReader(output.read, output.cleanup), READ_BUFFER_BYTES)
    try:
        stream.peek(1)  # a command that fails at once fails here, inside the retry loop
    except BaseException:
        stream.close()
        raise
    return stream


def open_read(url: str, *, retries: int = 3, backoff: float = 0.5,
              hdfs_command: str = "hdfs dfs -cat") -> BinaryIO:
    """A binary stream over the URL, opened with up to ``retries`` attempts and exponential backoff.

    The stream suits sequential readers such as ``tarfile.open(fileobj=stream, mode="r|")``.
    """
    client = s3_client(max_attempts=1) if _scheme(url) == "s3" else None  # this loop does the retrying
    attempts = max(1, retries)
    last_error: BaseException | None = None
    for attempt in range(attempts):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            return _open_once(url, hdfs_command, client)
        except Exception as error:  # every failure is retried, then reported with the URL
            last_error = error
    kind = SourceNotFound if _is_not_found(last_error) else SourceUnreachable
    raise kind(f"could not open {url} after {attempts} attempts: {last_error}") from last_error


def _is_not_found(error: BaseException | None) -> bool:
    if isinstance(error, FileNotFoundError):
        return True
    response = getattr(error, "response", None)  # botocore's ClientError
    return isinstance(response, dict) and response.get("Error", {}).get("Code") in _S3_NOT_FOUND_CODES


def read_bytes(url: str, **open_options) -> bytes:
    with open_read(url, **open_options) as stream:
        return stream.read()


def open_data_read(url: str, **open_options) -> BinaryIO:
    """``open_read`` for a location taken from data: a ``pipe:`` command is refused (ValueError), not run."""
    if _scheme(url) == "pipe":
        raise ValueError(f"refusing to open {url!r}: it comes from data, and pipe: commands come only from "
                         "configuration")
    return open_read(url, **open_options)


def read_data_bytes(url: str, **open_options) -> bytes:
    with open_data_read(url, **open_options) as stream:
        return stream.read()


def _s3_head(url: str) -> dict | None:
    from botocore.exceptions import ClientError

    bucket, key = _split_s3(url)
    try:
        return s3_client().head_object(Bucket=bucket, Key=key)
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") in _S3_NOT_FOUND_CODES:
            return None
        raise


def exists(url: str) -> bool:
    """Whether a local file or S3 object exists (other schemes cannot be asked)."""
    scheme = _scheme(url)
    if scheme == "local":
        return os.path.exists(_local_path(url))
    if scheme == "s3":
        return _s3_head(url) is not None
    raise ValueError(f"cannot check whether {url} exists: only local paths and s3:// URLs support it")


def size(url: str) -> int:
    """Size in bytes of a local file or S3 object."""
    scheme = _scheme(url)
    if scheme == "local":
        return os.path.getsize(_local_path(url))
    if scheme == "s3":
        head = _s3_head(url)
        if head is None:
            raise FileNotFoundError(f"no S3 object {url}")
        return int(head["ContentLength"])
    raise ValueError(f"cannot get the size of {url}: only local paths and s3:// URLs support it")


def list_dir(url_prefix: str) -> list[str]:
    """Full URLs of the entries directly inside a local directory or an S3 "folder", sorted."""
    scheme = _scheme(url_prefix)
    if scheme == "local":
        directory = _local_path(url_prefix)
        return sorted(join(url_prefix, name) for name in os.listdir(directory))
    if scheme != "s3":
        raise ValueError(f"cannot list {url_prefix}: only local directories and s3:// prefixes can be listed")
    bucket, prefix = _split_s3(url_prefix)
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    entries = []
    pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/")
    for page in pages:
        entries += [f"s3://{bucket}/{item['Key']}" for item in page.get("Contents", [])]
        entries += [f"s3://{bucket}/{item['Prefix'].rstrip('/')}" for item in page.get("CommonPrefixes", [])]
    return sorted(entries)


def _no_folder(url: str, what: str) -> ValueError:
    return ValueError(f"cannot {what} {url!r}: a pipe: command has no folder; name the file itself instead")


def join(url_dir: str, name: str) -> str:
    scheme = _scheme(url_dir)
    if scheme == "pipe":  # appending to a command would run a command nobody wrote
        raise _no_folder(url_dir, f"put {name!r} inside")
    if scheme == "local" and not url_dir.startswith("file://"):
        return os.path.join(url_dir, name)
    return url_dir.rstrip("/") + "/" + name


def parent(url: str) -> str:
    """The folder of a file URL. A ``pipe:`` command has none (nor does ``join`` put a name inside one):
    deriving, say, a ``sizes.json`` beside it would run a command nobody configured."""
    scheme = _scheme(url)
    if scheme == "pipe":
        raise _no_folder(url, "take the folder of")
    if scheme == "local" and not url.startswith("file://"):
        return os.path.dirname(url) or "."
    if scheme == "s3":
        bucket, key = _split_s3(url)
        head = key.rstrip("/").rpartition("/")[0]
        return f"s3://{bucket}/{head}" if head else f"s3://{bucket}"
    return url.rstrip("/").rpartition("/")[0]


class _MultipartWriter(io.RawIOBase):
    """Buffers writes into S3 multipart parts; nothing is visible until ``commit``."""

    def __init__(self, client, bucket: str, key: str, part_bytes: int) -> None:
        super().__init__()
        self._client, self._bucket, self._key, self._part_bytes = client, bucket, key, part_bytes
        self._buffer = bytearray()
        self._position = 0
        self._upload_id: str | None = None
        self._parts: list[dict] = []

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self._buffer += data
        written = len(data) if not isinstance(data, memoryview) else data.nbytes
        self._position += written
        while len(self._buffer) >= self._part_bytes:
            self._upload_part(bytes(self._buffer[: self._part_bytes]))
            del self._buffer[: self._part_bytes]
        return written

    def tell(self) -> int:
        return self._position

    def _upload_part(self, chunk: bytes) -> None:
        if self._upload_id is None:
            created = self._client.create_multipart_upload(Bucket=self._bucket, Key=self._key)
            self._upload_id = created["UploadId"]
        number = len(self._parts) + 1
        answer = self._client.upload_part(Bucket=self._bucket, Key=self._key, UploadId=self._upload_id,
                                          PartNumber=number, Body=chunk)
        self._parts.append({"ETag": answer["ETag"], "PartNumber": number})

    def commit(self) -> None:
        if self._upload_id is None:
            # Smaller than one part: a single PUT is just as atomic and leaves no upload to clean up.
            self._client.put_object(Bucket=self._bucket, Key=self._key, Body=bytes(self._buffer))
            return
        if self._buffer:
            self._upload_part(bytes(self._buffer))
            self._buffer.clear()
        self._client.complete_multipart_upload(Bucket=self._bucket, Key=self._key, UploadId=self._upload_id,
                                               MultipartUpload={"Parts": self._parts})

    def abort(self) -> None:
        if self._upload_id is not None:
            self._client.abort_multipart_upload(Bucket=self._bucket, Key=self._key, UploadId=self._upload_id)


def _fsync_directory(directory: str) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextmanager
def atomic_write(url: str, *, part_bytes: int = DEFAULT_PART_BYTES) -> Iterator[BinaryIO]:
    """A writable stream whose data appears at ``url`` only if the block ends without an exception.

    Locally: a hidden temporary file in the same directory, fsynced, then renamed over the target.
    On S3: a multipart upload of ``part_bytes`` parts, completed on success and aborted on failure.
    """
    scheme = _scheme(url)
    if scheme == "s3":
        if part_bytes < S3_MINIMUM_PART_BYTES:
            raise ValueError(f"S3 parts must be at least {S3_MINIMUM_PART_BYTES} bytes, got {part_bytes}")
        bucket, key = _split_s3(url)
        writer = _MultipartWriter(s3_client(), bucket, key, part_bytes)
        try:
            yield writer
            writer.commit()
        except BaseException:
            writer.abort()
            raise
        return
    if scheme != "local":
        raise ValueError(f"cannot write {url}: only local paths and s3:// URLs can be written")
    path = os.path.abspath(_local_path(url))
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.",
                                             suffix=PARTIAL_SUFFIX)
    try:
        with os.fdopen(descriptor, "wb") as sink:
            yield sink
            sink.flush()
            os.fsync(sink.fileno())
        os.chmod(temporary, 0o644)  # mkstemp makes 0600; shards are meant to be shared
        os.replace(temporary, path)
        _fsync_directory(directory)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def discard_partial_writes(folder_url: str, names: Iterable[str]) -> int:
    """Remove what interrupted ``atomic_write`` calls to ``folder_url/NAME`` left behind; returns how many.

    Locally these are the hidden temporary files; on S3 the incomplete multipart uploads, which are
    invisible to readers but still stored. One listing covers all names. Only call this when no other
    writer targets those names.
    """
    names = set(names)
    scheme = _scheme(folder_url)
    if scheme == "local":
        directory = _local_path(folder_url)
        if not os.path.isdir(directory):
            return 0
        leftovers = [entry for entry in os.listdir(directory) if entry.startswith(".")
                     and entry.endswith(PARTIAL_SUFFIX) and entry[1:].rsplit(".", 2)[0] in names]
        for entry in leftovers:
            os.unlink(os.path.join(directory, entry))
        return len(leftovers)
    if scheme != "s3":
        raise ValueError(f"cannot clean up writes to {folder_url}: only local paths and s3:// URLs can be "
                         "written")
    bucket, prefix = _split_s3(folder_url)
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    client = s3_client()
    stale = []
    for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=prefix):
        stale += [upload for upload in page.get("Uploads", []) if upload["Key"][len(prefix):] in names]
    for upload in stale:
        client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
    return len(stale)
