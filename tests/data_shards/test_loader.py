"""StreamingLoader: batches in workers, exact resume (same keys and pixels), skip counts, postprocess."""

from __future__ import annotations

import tarfile

import torch

from data_shards.boxes import TransformConfig
from data_shards.loader import StreamingLoader
from data_shards.tar_samples import SKIP_UNDECODABLE_IMAGE
from tests.data_shards.shard_factory import add_member, jpeg_bytes, write_dataset

TRAIN = TransformConfig(image_size=32, train=True)


def make_loader(pattern: str, **overrides) -> StreamingLoader:
    options = dict(batch_size=4, num_workers=2, shuffle_buffer=6, seed=7, decoder="pil")
    options.update(overrides)
    return StreamingLoader(pattern, TRAIN, **options)


def test_resume_mid_epoch_gives_the_same_batches(tmp_path):
    write_dataset(tmp_path, num_shards=4, per_shard=9)
    pattern = str(tmp_path / "train-{000000..000003}.tar")
    straight = list(make_loader(pattern))
    assert len(straight) == 8  # each worker drops its partial batch (18 samples -> 4 batches)

    loader = make_loader(pattern)
    head = []
    for batch in loader:
        head.append(batch)
        if len(head) == 3:
            break
    state = loader.state_dict()
    resumed = make_loader(pattern)
    resumed.load_state_dict(state)
    tail = list(resumed)
    assert [b["__key__"] for b in head + tail] == [b["__key__"] for b in straight]
    for got, want in zip(head + tail, straight, strict=True):
        assert torch.equal(got["image"], want["image"])  # augmentations are redrawn identically
    assert resumed.epoch == 1 and loader.epoch == 0


def test_epochs_differ_and_cover_everything(tmp_path):
    write_dataset(tmp_path, num_shards=2, per_shard=8)
    loader = make_loader(str(tmp_path / "train-{000000..000001}.tar"), drop_last=False)
    first = [key for batch in loader for key in batch["__key__"]]
    second = [key for batch in loader for key in batch["__key__"]]
    assert sorted(first) == sorted(second) and len(first) == 16
    assert first != second


def test_undecodable_images_are_counted_and_postprocess_runs(tmp_path):
    path = tmp_path / "mixed-000000.tar"
    with tarfile.open(path, "w") as archive:
        for index in range(6):
            data = b"\xff\xd8 not really a jpeg" if index in (1, 4) else jpeg_bytes()
            add_member(archive, f"k{index}.jpg", data)
            add_member(archive, f"k{index}.txt", f"text {index}".encode())

    def add_lengths(batch):
        return {**batch, "lengths": torch.tensor([len(text) for text in batch["text"]])}

    loader = StreamingLoader(str(path), TRAIN, batch_size=2, num_workers=0, shuffle_buffer=0, decoder="pil",
                             postprocess=add_lengths)
    batches = list(loader)
    keys = [key for batch in batches for key in batch["__key__"]]
    assert keys == ["k0", "k2", "k3", "k5"]
    assert batches[0]["lengths"].tolist() == [6, 6]
    assert batches[0]["image"].shape == (2, 3, 32, 32)
    assert loader.skipped == {SKIP_UNDECODABLE_IMAGE: 2}
    assert loader.state_dict()["skipped_earlier"] == {SKIP_UNDECODABLE_IMAGE: 2}
