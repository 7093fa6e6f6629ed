"""The shared fine-tuning loop: what it refuses before spending any training time."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest

from finetune.loop import DataError, require_samples
from tests.finetune.conftest import run_finetune, write_finetune_config, write_micro_batch_config


def _empty_shard(path) -> str:
    tarfile.open(path, "w").close()
    return str(path)


def test_require_samples_names_the_empty_split(tmp_path, finetune_world):
    empty = _empty_shard(tmp_path / "empty-000000.tar")
    require_samples({"train": finetune_world["ve_train"], "val": None})  # None: not configured, not checked
    with pytest.raises(DataError, match=r"val split '.*empty-000000.tar' holds no sample"):
        require_samples({"train": finetune_world["ve_train"], "val": empty})


def test_require_samples_names_a_pattern_that_matches_nothing(tmp_path):
    pattern = f"{tmp_path}/typo/train-{{000000..000003}}.tar"
    with pytest.raises(DataError, match=rf"^data.train: shard pattern '{tmp_path}/typo/train-\{{000000..000003\}}.tar' "
                                        r"matches no file \(4 name\(s\) tried"):
        require_samples({"train": pattern, "val": None})


def test_an_empty_val_split_fails_before_training(tmp_path, finetune_world, tiny_checkpoint):
    empty = _empty_shard(tmp_path / "empty-000000.tar")
    data = {"train": finetune_world["ve_train"], "val": empty, "test": finetune_world["ve_test"]}
    config = write_finetune_config(tmp_path, "ve", data)
    result = run_finetune("ve", config, tiny_checkpoint, write_micro_batch_config(tmp_path), check=False)
    assert result.returncode == 2
    assert f"error: val split {empty!r} holds no sample" in result.stderr
    log = tmp_path / "run" / "logs" / "metrics.jsonl"
    assert not log.exists() or '"step"' not in log.read_text()  # refused before the first training step


def test_a_rank_short_of_samples_stops_every_rank(tmp_path, finetune_world, tiny_checkpoint):
    """A sizes.json that counts one sample too many leaves exactly one of 2 ranks short: both must exit with the
    counts (the short rank alone raising would leave the other waiting in the next collective)."""
    source = Path(finetune_world["ve_test"].replace("{000000..000000}", "000000"))
    (tmp_path / "ve").mkdir()
    shutil.copy(source, tmp_path / "ve" / source.name)
    sizes = json.loads((source.parent / "sizes.json").read_text())
    real = sizes[source.name]
    sizes[source.name] = real + 1
    (tmp_path / "ve" / "sizes.json").write_text(json.dumps(sizes))
    config = write_finetune_config(tmp_path, "ve", {"test": str(tmp_path / "ve" / source.name)})
    result = run_finetune("ve", config, tiny_checkpoint, write_micro_batch_config(tmp_path), ranks=2, check=False,
                          extra=["--evaluate"], timeout=180)
    assert result.returncode != 0
    short = real % 2  # the missing sample, index ``real``, is that rank's
    message = f"rank {short} predicted {real // 2} of its {real // 2 + 1} samples (is a sizes.json"
    assert (result.stdout + result.stderr).count(message) == 2  # said by both ranks
