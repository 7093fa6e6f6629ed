"""Training batches: the image-text stream, plus the extra streams a method draws from, in lockstep on all ranks.

Every step takes one batch of the main stream (``data.train``). A method's extra stream (``data.streams.<name>``,
e.g. X-VLM's region batches) joins a step with its ``probability``: the draw comes from a generator seeded
alike on every rank, so all ranks take the same streams at the same step (their forward passes, and the
collectives inside them, stay in step). The extra batches ride along under ``batch["streams"][name]``;
objectives that read a stream look there. Position, RNG and skip counts resume exactly::

    batches = TrainingBatches(main_loader, {"regions": (region_loader, 0.5)}, seed=0, group=control_group())
    batch = next(batches)              # {"image", "input_ids", ..., "streams": {"regions": {...}}}
    state = batches.state_dict()
"""

from __future__ import annotations

import random
from collections import Counter

from data_shards.boxes import TransformConfig
from data_shards.loader import StreamingLoader
from data_shards.reader import Source
from pretrain.lockstep import lockstep_batches
from pretrain.schema import DataConfig, SourceConfig


def make_loader(sources: list[SourceConfig], data: DataConfig, image_size: int, micro_batch: int, *, rank: int,
                world_size: int, device: str, seed: int, postprocess, transform: dict) -> StreamingLoader:
    """A training loader over ``sources`` with the data section's augmentation and reading settings."""
    config = TransformConfig(image_size=image_size, train=True, crop_scale=data.crop_scale,
                             crop_mode=data.crop_mode, hflip_prob=0.5 if data.hflip else 0.0,
                             randaugment_ops=2 if data.randaugment else 0,
                             **transform)
    return StreamingLoader([Source(source.urls, source.weight) for source in sources], config,
                           batch_size=micro_batch, rank=rank, world_size=world_size, num_workers=data.num_workers,
                           mode=data.mode, shuffle_buffer=data.shuffle_buffer, seed=seed, decoder=data.decoder,
                           device=device, postprocess=postprocess, hdfs_command=data.hdfs_command)


class TrainingBatches:
    """The main stream's batches, each with the extra streams drawn for its step (see the module docstring)."""

    def __init__(self, main: StreamingLoader, extra: dict[str, tuple[StreamingLoader, float]], *, seed: int,
                 group=None):
        self.main = main
        self.extra = extra
        self.group = group
        self._draws = random.Random(f"streams:{seed}")
        self._iterators = None

    def _start(self) -> None:
        self._iterators = {"": lockstep_batches(self.main, self.group)}
        for name, (loader, _probability) in self.extra.items():
            self._iterators[name] = lockstep_batches(loader, self.group)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._iterators is None:
            self._start()
        batch = next(self._iterators[""])
        drawn = {name: next(self._iterators[name]) for name, (_loader, probability) in self.extra.items()
                 if self._draws.random() < probability}
        if drawn:
            batch = {**batch, "streams": drawn}
        return batch

    @property
    def epoch(self) -> int:
        return self.main.epoch

    @property
    def skipped(self) -> Counter:
        total = Counter(self.main.skipped)
        for loader, _probability in self.extra.values():
            total.update(loader.skipped)
        return total

    def state_dict(self) -> dict:
        state = self.main.state_dict()  # the main stream's position at the top level, as before streams existed
        if self.extra:
            state["streams"] = {name: loader.state_dict() for name, (loader, _) in self.extra.items()}
            state["draws"] = self._draws.getstate()
        return state

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        streams, draws = state.pop("streams", {}), state.pop("draws", None)
        self.main.load_state_dict(state)
        for name, (loader, _probability) in self.extra.items():
            if name in streams:
                loader.load_state_dict(streams[name])
        if draws is not None:
            version, internal, gauss = draws
            self._draws.setstate((version, tuple(internal), gauss))
