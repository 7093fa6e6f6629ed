"""Test helper: write small WebDataset tars with plain ``tarfile`` (independent of the builder)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from PIL import Image


def jpeg_bytes(color=(200, 30, 30), size=(24, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def add_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    archive.addfile(info, io.BytesIO(data))


def write_shard(path: Path, keys: list[str], *, image: bytes | None = None, extra: dict | None = None) -> Path:
    """One tar with samples {key}.jpg/.txt/.json; json holds the key so alignment can be checked."""
    image = image if image is not None else jpeg_bytes()
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as archive:
        for key in keys:
            add_member(archive, f"{key}.jpg", image)
            add_member(archive, f"{key}.txt", f"caption of {key}".encode())
            add_member(archive, f"{key}.json", json.dumps({"key": key, **(extra or {})}).encode())
    return path


def write_dataset(directory: Path, num_shards: int, per_shard: int, prefix: str = "train") -> list[str]:
    """``num_shards`` shards of ``per_shard`` samples; returns the shard paths in order."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in range(num_shards):
        keys = [f"s{shard:03d}k{index:04d}" for index in range(per_shard)]
        paths.append(str(write_shard(directory / f"{prefix}-{shard:06d}.tar", keys)))
    return paths
