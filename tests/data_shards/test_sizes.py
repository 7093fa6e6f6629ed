"""data_shards.sizes: sample counts from sizes.json and the source checks training runs before it starts.

Run: ``.venv/bin/python -m pytest -q tests/data_shards/test_sizes.py``. The bad-input cases (patterns that
match nothing, pipe: sources, broken sizes.json) are in tests/data_shards/test_bad_input.py.
"""

from __future__ import annotations

import json

import pytest

from data_shards.sizes import SizesUnknown, check_sources, samples_in
from tests.data_shards.shard_factory import write_dataset


def test_samples_in_reads_sizes_json_per_folder(tmp_path):
    for folder, sizes in (("a", {"a-0.tar": 3, "a-1.tar": 4}), ("b", {"b-0.tar": 5})):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "sizes.json").write_text(json.dumps(sizes))
    assert samples_in(f"{tmp_path}/a/a-{{0..1}}.tar::{tmp_path}/b/b-0.tar") == 12
    with pytest.raises(SizesUnknown, match=r"b/sizes.json has no entry for b-1.tar; set data.samples_per_epoch"):
        samples_in(f"{tmp_path}/a/a-0.tar::{tmp_path}/b/b-{{0..1}}.tar")
    with pytest.raises(SizesUnknown, match="no readable sizes.json beside .*c-0.tar; set data.train_samples"):
        samples_in(f"{tmp_path}/c/c-0.tar", setting="data.train_samples")


def test_existing_local_and_unaskable_sources_pass_the_check(tmp_path):
    write_dataset(tmp_path, num_shards=2, per_shard=1)
    check_sources([f"{tmp_path}/train-{{000000..000001}}.tar", "hdfs://namenode/data/x-{0..9}.tar",
                   f"pipe:cat {tmp_path}/absent.tar"], mode="exact")
    with pytest.raises(ValueError, match="mode must be one of"):
        check_sources(f"{tmp_path}/train-000000.tar", mode="sometimes")
