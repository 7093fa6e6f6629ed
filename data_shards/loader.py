"""The batch loader that pretraining and fine-tuning use: shards -> decoded, augmented batches.

``StreamingLoader`` runs a :class:`~data_shards.reader.ShardReader` in torch DataLoader workers.
With the PIL decoder, workers read, decode, augment and batch; with DALI, workers only read and batch
the encoded samples, and the main process decodes them through :class:`~data_shards.dali_pipeline.
DaliDecoder` (``device="gpu"`` uses the ``mixed`` decoder). Both yield the same batch dict:
``{"__key__": [...], "image": Tensor[B,3,H,W] (or [B,2,3,H,W]), "text": [...], "meta": [...]}``, then
``postprocess(batch)`` if given (tokenisation, in the workers for PIL).

Every batch carries its worker's reader position, so ``state_dict()`` is the position after the last
batch handed to the caller (prefetched batches are read again after a resume), and skip counts
(``skipped``) add up over all workers for the training log. Example::

    loader = StreamingLoader([Source("shards/train-{000000..000007}.tar")], TransformConfig(),
                             batch_size=32, num_workers=2, shuffle_buffer=1000)
    for batch in loader: ...
    torch.save(loader.state_dict(), "loader.pt")
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset

from data_shards.boxes import TransformConfig
from data_shards.reader import ShardReader, Source
from data_shards.tar_samples import SKIP_UNDECODABLE_IMAGE
from data_shards.transforms import PilTransform, collate

DECODERS = ("pil", "dali", "auto")


class _WorkerBatches(IterableDataset):
    """Worker side: reader -> (decode + augment) -> batches tagged with the reader position."""

    def __init__(self, reader: ShardReader, transform: PilTransform | None, batch_size: int, drop_last: bool,
                 postprocess: Callable[[dict], dict] | None):
        self.reader = reader
        self.transform = transform
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.postprocess = postprocess

    def __iter__(self):
        reader = self.reader
        pending: list[dict] = []
        for sample in reader:
            if self.transform is not None:
                try:
                    sample = self.transform(sample)
                except ValueError as error:  # ImageRejected says why; other decode failures are one reason
                    reader.skipped[getattr(error, "reason", SKIP_UNDECODABLE_IMAGE)] += 1
                    continue
            pending.append(sample)
            if len(pending) == self.batch_size:
                yield self._package(pending)
                pending = []
        if pending and not self.drop_last:
            yield self._package(pending)

    def _package(self, samples: list[dict]) -> dict:
        if self.transform is None:
            return {"batch": {"samples": samples}, "position": self.reader.snapshot()}
        batch = collate(samples)
        if self.postprocess is not None:
            batch = self.postprocess(batch)
        return {"batch": batch, "position": self.reader.snapshot()}


class StreamingLoader:
    """Iterate one epoch per ``iter()`` (exact mode) or forever (resampled); resumable."""

    def __init__(
        self,
        sources: str | Source | Sequence[str | Source],
        transform: TransformConfig,
        *,
        batch_size: int,
        rank: int | None = None,
        world_size: int | None = None,
        num_workers: int = 2,
        mode: str = "exact",
        shuffle_buffer: int = 1000,
        seed: int = 0,
        decoder: str = "auto",
        device: str = "cpu",
        drop_last: bool = True,
        max_batches: int | None = None,
        postprocess: Callable[[dict], dict] | None = None,
        hdfs_command: str = "hdfs dfs -cat",
    ):
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.reader = ShardReader(sources, rank=rank, world_size=world_size, num_workers=num_workers,
                                  mode=mode, shuffle_buffer=shuffle_buffer, seed=seed, hdfs_command=hdfs_command)
        self.transform_config = transform
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.device = device
        self.drop_last = drop_last
        self.max_batches = max_batches
        self.postprocess = postprocess
        self.decoder = resolve_decoder(decoder, device)
        self.epoch = 0
        self.batches_in_epoch = 0
        self._positions: dict[int, dict] = {}
        self._skipped_earlier: Counter = Counter()
        self._dali = None

    # -- state -----------------------------------------------------------------------------------
    @property
    def skipped(self) -> Counter:
        """Skipped samples by reason, over all workers of this rank since the run began."""
        total = Counter(self._skipped_earlier)
        for position in self._positions.values():
            total.update(position.get("skipped", {}))
        if self._dali is not None:
            total.update(self._dali.skipped)
        return total

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch,
                "slots": {slot: dict(position) for slot, position in self._positions.items()},
                "skipped_earlier": dict(self._skipped_earlier)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = state["epoch"]
        self.batches_in_epoch = state["batches_in_epoch"]
        self._positions = {int(slot): position for slot, position in state["slots"].items()}
        self._skipped_earlier = Counter(state.get("skipped_earlier", {}))

    # -- iteration -------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        workers = max(self.num_workers, 1)
        self.reader.load_state_dict({"epoch": self.epoch, "slots": self._positions},
                                    slot_rotation=self.batches_in_epoch % workers)
        transform = None
        if self.decoder == "pil":
            transform = PilTransform(self.transform_config, seed=self.seed)
            transform.set_epoch(self.epoch)
        dataset = _WorkerBatches(self.reader, transform, self.batch_size, self.drop_last, self.postprocess)
        # Its own generator: worker seeding must not draw from the global torch RNG, whose state a
        # resumed run restores (dropout, masking) and must find exactly where the first run left it.
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers, persistent_workers=False,
                            pin_memory=False, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        for item in loader:
            if self.max_batches is not None and self.batches_in_epoch >= self.max_batches:
                break
            position = item["position"]
            self._positions[position["slot"]] = position
            self.batches_in_epoch += 1
            batch = item["batch"]
            if "samples" in batch:
                batch = self._decode_on_main(batch["samples"])
                if self.postprocess is not None:
                    batch = self.postprocess(batch)
            yield batch
        self.end_epoch()

    def end_epoch(self) -> None:
        """Move to the next epoch; called at the natural end, or by a caller that stops all ranks early."""
        self._skipped_earlier = self.skipped
        if self._dali is not None:
            self._dali.skipped.clear()  # now counted in _skipped_earlier
        self.epoch += 1
        self.batches_in_epoch = 0
        self._positions = {}

    def _decode_on_main(self, samples: list[dict]) -> dict:
        if self._dali is None:
            from data_shards.dali_pipeline import DaliDecoder

            self._dali = DaliDecoder(self.transform_config, self.batch_size, device=self.device, seed=self.seed)
        self._dali.set_epoch(self.epoch)
        return self._dali.decode(samples)


def resolve_decoder(decoder: str, device: str) -> str:
    """``auto`` picks DALI when it imports (needed for GPU decode), PIL otherwise."""
    if decoder != "auto":
        return decoder
    from data_shards.dali_pipeline import dali_available

    usable, _reason = dali_available()
    return "dali" if usable and device == "gpu" and torch.cuda.is_available() else "pil"
