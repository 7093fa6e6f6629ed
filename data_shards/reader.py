"""Streaming shard reader: rank/worker split, seeded shuffle buffer, exact resume.

``ShardReader`` is a torch ``IterableDataset`` over WebDataset tars on local disk, S3, HDFS or behind
``pipe:`` commands (opened by :mod:`data_shards.storage`). It yields raw samples (see
:mod:`data_shards.tar_samples`): image members as bytes, ``txt`` as str, ``json`` as a dict.

Each reading slot is one (global rank, loader worker) pair. In ``exact`` mode the shards of an epoch
(shuffled identically on every slot with ``seed + epoch``) are dealt round-robin to the slots, so
every sample is read exactly once per epoch across all ranks and workers; fewer shards than slots is
an error, never a hang. In ``resampled`` mode each slot draws shards with replacement, weighted by
source, forever.

The slot's position is a small dict (epoch, shard cursor, offset in the shard, the shuffle buffer as
(shard, index) pairs, the RNG state), so a resumed run continues without repeating or skipping
samples: the buffered samples are re-read from their shards, and the current shard is re-opened past
the samples already taken.

A shard that no longer exists (deleted or moved while a run goes on) fails an ``exact`` epoch with its
URL named. In ``resampled`` mode it is warned about once, counted in ``skipped`` under
``shard not found (vanished)`` and never drawn again by that slot (the list rides in the slot's position);
only when no shard of any source is left does reading stop, with an error naming the sources. Example::

    reader = ShardReader([Source("data/shards/train-{000000..000015}.tar")], shuffle_buffer=1000, seed=0)
    for sample in reader: ...
    state = reader.state_dict()          # single-process use; data_shards.loader handles workers
"""

from __future__ import annotations

import copy
import random
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info

from data_shards import storage
from data_shards.tar_samples import SKIP_VANISHED_SHARD, iter_samples

MODES = ("exact", "resampled")


@dataclass(frozen=True)
class Source:
    """One data source: a URL spec (brace pattern, ``::`` list) and its mixing weight (resampled mode)."""

    urls: str
    weight: float = 1.0


@dataclass(frozen=True)
class SlotPlan:
    """One reading slot (a rank's loader worker) and how many slots share the data."""

    slot: int
    num_slots: int


def as_sources(spec: str | Source | Sequence[str | Source]) -> list[Source]:
    if isinstance(spec, (str, Source)):
        spec = [spec]
    return [item if isinstance(item, Source) else Source(item) for item in spec]


def default_rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ShardReader(IterableDataset):
    """Iterable over raw samples of WebDataset shards; see the module docstring."""

    def __init__(
        self,
        sources: str | Source | Sequence[str | Source],
        *,
        rank: int | None = None,
        world_size: int | None = None,
        num_workers: int = 0,
        mode: str = "exact",
        shuffle_buffer: int = 0,
        shard_shuffle: bool = True,
        seed: int = 0,
        epoch: int = 0,
        retries: int = 3,
        hdfs_command: str = "hdfs dfs -cat",
    ):
        if mode not in MODES:
            raise ValueError(f"reader mode must be one of {MODES}, got {mode!r}")
        self.sources = as_sources(sources)
        self.shard_lists = [storage.expand_urls(source.urls) for source in self.sources]
        for source, urls in zip(self.sources, self.shard_lists, strict=True):
            if not urls:
                raise ValueError(f"data source {source.urls!r} expands to no shard")
            if source.weight <= 0:
                raise ValueError(f"data source {source.urls!r} has weight {source.weight}; weights must be > 0")
        if mode == "exact" and len({source.weight for source in self.sources}) > 1:
            raise ValueError("mixing weights need mode='resampled'; exact mode reads every shard once per epoch")
        default_rank, default_world = default_rank_and_world()
        self.rank = default_rank if rank is None else rank
        self.world_size = default_world if world_size is None else world_size
        self.num_workers = num_workers
        self.mode = mode
        self.shuffle_buffer = shuffle_buffer
        self.shard_shuffle = shard_shuffle
        self.seed = seed
        self.epoch = epoch
        self.retries = retries
        self.hdfs_command = hdfs_command
        self.skipped: Counter = Counter()
        self._resume: dict[int, dict] = {}
        self._live: tuple | None = None
        self._slot_rotation = 0
        self._draw_lists: tuple[tuple, list[list[str]]] | None = None
        check_enough_shards(self.all_shards, self.world_size, max(num_workers, 1), mode)

    @property
    def all_shards(self) -> list[str]:
        return [url for urls in self.shard_lists for url in urls]

    # -- the dealing ---------------------------------------------------------------------------
    def slot_plan(self) -> SlotPlan:
        info = get_worker_info()
        workers = info.num_workers if info is not None else 1
        worker = info.id if info is not None else 0
        if self.num_workers and info is not None and workers != self.num_workers:
            raise RuntimeError(f"reader built for {self.num_workers} workers runs in a loader with {workers}")
        # After a resume the loader rotates which physical worker plays which logical slot, so the
        # batches keep arriving in the order of an uninterrupted run.
        logical = (worker + self._slot_rotation) % workers
        return SlotPlan(slot=self.rank * workers + logical, num_slots=self.world_size * workers)

    def epoch_shards(self, epoch: int, plan: SlotPlan) -> list[str]:
        """Exact mode: this slot's shards for ``epoch`` (same shuffle on every slot, then dealt)."""
        shards = self.all_shards
        check_enough_shards(shards, 1, plan.num_slots, "exact")
        if self.shard_shuffle:
            shards = shards[:]
            random.Random(f"{self.seed}:{epoch}").shuffle(shards)
        return shards[plan.slot :: plan.num_slots]

    def draw_shard(self, rng: random.Random, vanished: Sequence[str] = ()) -> str:
        """Resampled mode: a source by weight, then a shard of it uniformly, leaving out vanished shards."""
        shard_lists = self._shards_left(vanished) if vanished else self.shard_lists
        weights = [source.weight if urls else 0.0 for source, urls in zip(self.sources, shard_lists, strict=True)]
        if not any(weights):
            names = ", ".join(repr(source.urls) for source in self.sources)
            raise storage.SourceNotFound(
                f"no shard of {names} can be read any more: all {len(self.all_shards)} were not found "
                f"(deleted or moved since the run started); restore them or point data.train at shards that exist")
        urls = rng.choices(shard_lists, weights=weights)[0]
        return urls[rng.randrange(len(urls))]

    def _shards_left(self, vanished: Sequence[str]) -> list[list[str]]:
        key = tuple(vanished)  # the list only grows, so it names the filtered lists exactly
        if self._draw_lists is None or self._draw_lists[0] != key:
            gone = set(vanished)
            self._draw_lists = (key, [[url for url in urls if url not in gone] for urls in self.shard_lists])
        return self._draw_lists[1]

    def _vanish(self, url: str, state: dict) -> None:
        """Resampled mode: a shard that is not found any more is skipped from now on, said once."""
        vanished = state.setdefault("vanished", [])
        if url in vanished:
            return
        vanished.append(url)
        self.skipped[SKIP_VANISHED_SHARD] += 1
        warnings.warn(f"shard {url} was not found (deleted or moved during the run?); resampled reading "
                      "skips it from now on", RuntimeWarning, stacklevel=2)

    # -- state -----------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def snapshot(self) -> dict | None:
        """This slot's position after the last sample yielded (a deep copy, safe to pickle)."""
        if self._live is None:
            return None
        state, buffer, rng = self._live
        snap = copy.deepcopy(state)
        snap["buffer"] = [(item["__url__"], item["__index__"]) for item in buffer]
        snap["rng"] = rng.getstate()
        snap["skipped"] = dict(self.skipped)
        return snap

    def state_dict(self) -> dict:
        """Position of a single-process reader (num_workers=0); data_shards.loader handles workers."""
        slots = dict(self._resume)
        snap = self.snapshot()
        if snap is not None:
            slots[snap["slot"]] = snap
        return {"epoch": self.epoch, "slots": slots, "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict, *, slot_rotation: int = 0) -> None:
        self.epoch = state["epoch"]
        self._resume = {int(slot): slot_state for slot, slot_state in state.get("slots", {}).items()}
        self.skipped = Counter(state.get("skipped", {}))
        self._slot_rotation = slot_rotation
        self._live = None

    def fresh_slot_state(self, plan: SlotPlan) -> dict:
        rng = random.Random(f"{self.seed}:{self.epoch}:{plan.slot}")
        return {"slot": plan.slot, "epoch": self.epoch, "cursor": 0, "offset": 0, "shard": None,
                "buffer": [], "rng": rng.getstate(), "emitted": 0, "done": False, "skipped": {}}

    # -- iteration -------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        plan = self.slot_plan()
        state = self._resume.get(plan.slot)
        if state is None or state["epoch"] != self.epoch:
            state = self.fresh_slot_state(plan)
        state = copy.deepcopy(state)
        self.skipped = Counter(state.get("skipped", {}))
        rng = random.Random()
        rng.setstate(_as_rng_state(state["rng"]))
        buffer = self._refill_buffer(state)
        self._live = (state, buffer, rng)
        shards = self.epoch_shards(self.epoch, plan) if self.mode == "exact" else None
        for sample in self._shuffled(self._stream(state, shards, rng), buffer, rng):
            # A name for this view of the sample that survives a resume: augmentation seeds use it.
            sample["__view__"] = f"{plan.slot}:{state['emitted']}"
            state["emitted"] += 1
            yield sample
        state["done"] = True

    def _stream(self, state: dict, shards: list[str] | None, rng: random.Random) -> Iterator[dict]:
        """Samples in shard order from the saved cursor on; updates cursor/offset as it goes."""
        while True:
            if state["shard"] is None:
                if shards is not None:
                    if state["cursor"] >= len(shards):
                        return
                    state["shard"] = shards[state["cursor"]]
                else:
                    state["shard"] = self.draw_shard(rng, state.get("vanished", ()))
                state["offset"] = 0
            url = state["shard"]
            try:
                stream = storage.open_read(url, retries=self.retries, hdfs_command=self.hdfs_command)
            except storage.SourceNotFound:
                if shards is not None:
                    raise  # exact mode promises every shard of the epoch: a missing one is the user's to fix
                self._vanish(url, state)
                state["shard"] = None
                continue
            with stream:
                for sample in iter_samples(stream, url, self.skipped, start=state["offset"]):
                    state["offset"] = sample["__index__"] + 1
                    yield sample
            state["shard"] = None
            state["cursor"] += 1

    def _shuffled(self, samples: Iterator[dict], buffer: list[dict], rng: random.Random):
        """Seeded buffer shuffle; the buffer list is shared with the caller so its state can be saved."""
        size = self.shuffle_buffer
        for sample in samples:
            if size <= 1:
                yield sample
                continue
            if len(buffer) < size:
                buffer.append(sample)
                continue
            pick = rng.randrange(len(buffer))
            chosen, buffer[pick] = buffer[pick], sample
            yield chosen
        while buffer:
            yield buffer.pop(rng.randrange(len(buffer)))

    def _refill_buffer(self, state: dict) -> list[dict]:
        """Re-read the samples a saved shuffle buffer held, in the saved order.

        In resampled mode the samples of a shard that vanished since are left out (the shard is counted as
        vanished); in exact mode that is an error.
        """
        locators = state["buffer"]
        if not locators:
            return []
        wanted: dict[str, set[int]] = {}
        for url, index in locators:
            wanted.setdefault(url, set()).add(index)
        found: dict[tuple[str, int], dict] = {}
        already_counted: Counter = Counter()  # these shards' skips were counted on the first read
        for url, indices in wanted.items():
            left = len(indices)
            try:
                stream = storage.open_read(url, retries=self.retries, hdfs_command=self.hdfs_command)
            except storage.SourceNotFound:
                if self.mode == "exact":
                    raise
                self._vanish(url, state)
                continue
            with stream:
                for sample in iter_samples(stream, url, already_counted, wanted=indices):
                    found[(url, sample["__index__"])] = sample
                    left -= 1
                    if left == 0:
                        break
        vanished = set(state.get("vanished", ()))
        locators = [loc for loc in locators if loc[0] not in vanished]
        missing = [tuple(loc) for loc in locators if tuple(loc) not in found]
        if missing:
            raise RuntimeError(f"cannot restore the shuffle buffer: {len(missing)} samples no longer in "
                               f"their shards (first: {missing[0]}); the shards changed since the checkpoint")
        return [found[tuple(loc)] for loc in locators]


def _as_rng_state(saved) -> tuple:
    """random.Random states survive JSON/torch.save as nested lists; setstate needs tuples."""
    version, internal, gauss = saved
    return version, tuple(internal), gauss


def check_enough_shards(shards: Sequence[str], world_size: int, num_workers: int, mode: str) -> None:
    slots = world_size * num_workers
    if mode == "exact" and len(shards) < slots:
        raise ValueError(
            f"{len(shards)} shard(s) cannot be split over {world_size} rank(s) x {num_workers} loader "
            f"worker(s) = {slots} readers in exact mode; write at least {slots} shards (smaller "
            f"--samples-per-shard), use fewer workers, or set mode='resampled'"
        )
