"""``python -m data_shards inspect``: JSON report and readable summary."""

from __future__ import annotations

import json
import tarfile

from data_shards.__main__ import main
from tests.data_shards.shard_factory import add_member, write_dataset


def test_inspect_json_counts_fields_and_skips(tmp_path, capsys):
    write_dataset(tmp_path, num_shards=2, per_shard=3)
    with tarfile.open(tmp_path / "train-000002.tar", "w") as archive:
        add_member(archive, "lonely.txt", b"no image here")
    assert main(["inspect", str(tmp_path / "train-{000000..000002}.tar"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["shards"] == 3 and report["samples"] == 6
    assert report["skipped"] == {"sample without image": 1}
    assert report["fields"] == {"jpg": 6, "json": 6, "txt": 6}
    assert report["json_fields"] == {"key": 6}
    assert report["per_shard"] == {"train-000000.tar": 3, "train-000001.tar": 3}
    assert report["examples"][0]["txt"] == "caption of s000k0000"


def test_inspect_readable_and_errors(tmp_path, capsys):
    write_dataset(tmp_path, num_shards=1, per_shard=2)
    assert main(["inspect", str(tmp_path / "train-000000.tar"), "--samples", "1"]) == 0
    out = capsys.readouterr().out
    assert "samples: 2" in out and "-- train-000000.tar / s000k0000" in out
    assert main(["inspect", str(tmp_path / "missing-{0..1}.tar")]) == 1
    assert "missing-0.tar" in capsys.readouterr().err
