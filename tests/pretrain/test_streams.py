"""Training batches from the main stream plus a method's extra streams: which steps draw them, and resume."""

from __future__ import annotations

import random

from data_shards.boxes import TransformConfig
from data_shards.loader import StreamingLoader
from pretrain.streams import TrainingBatches


def loader(urls: str, seed: int) -> StreamingLoader:
    return StreamingLoader(urls, TransformConfig(image_size=32, train=True), batch_size=4, num_workers=0,
                           mode="resampled", shuffle_buffer=8, seed=seed, decoder="pil")


def batches(urls: str) -> TrainingBatches:
    return TrainingBatches(loader(urls, 0), {"extra": (loader(urls, 1), 0.5)}, seed=7)


def keys(batch: dict) -> tuple:
    extra = batch.get("streams", {}).get("extra")
    return tuple(batch["__key__"]), tuple(extra["__key__"]) if extra else None


def test_extra_streams_join_the_steps_a_shared_seed_picks(tiny_shards):
    draws = random.Random("streams:7")
    expected = [draws.random() < 0.5 for _ in range(12)]
    first, second = batches(tiny_shards["train"]), batches(tiny_shards["train"])  # as two ranks would
    taken = [keys(next(first)) for _ in range(12)]
    assert [extra is not None for _, extra in taken] == expected
    assert [keys(next(second)) for _ in range(12)] == taken
    assert 0 < sum(expected) < 12


def test_a_resumed_run_continues_both_streams_where_they_stopped(tiny_shards):
    straight = batches(tiny_shards["train"])
    whole = [keys(next(straight)) for _ in range(10)]
    interrupted = batches(tiny_shards["train"])
    head = [keys(next(interrupted)) for _ in range(4)]
    state = interrupted.state_dict()
    assert set(state) >= {"epoch", "slots", "streams", "draws"}  # the main position stays at the top level
    resumed = batches(tiny_shards["train"])
    resumed.load_state_dict(state)
    assert head + [keys(next(resumed)) for _ in range(6)] == whole
