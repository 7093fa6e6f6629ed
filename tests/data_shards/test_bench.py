"""Tests for data_shards/bench.py: the JSON report's fields and counts on tiny shards, the table, the
image cap, and the errors a user can cause. Speeds are not asserted.

Run: ``.venv/bin/python -m pytest -q tests/data_shards/test_bench.py``.
"""

import json
import tarfile

import pytest
import torch

from data_shards import bench
from data_shards.dali_pipeline import dali_available
from tests.data_shards.shard_factory import add_member, jpeg_bytes, write_dataset

RATES = ("raw_tar_read", "read", "decode", "augment")


@pytest.fixture
def shards(tmp_path) -> str:
    write_dataset(tmp_path, num_shards=2, per_shard=6)  # 12 samples, one jpg each
    return str(tmp_path / "train-{000000..000001}.tar")


def run_json(capsys, argv: list[str]) -> dict:
    assert bench.main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("decoder, threads", [
    pytest.param("dali", 1, marks=pytest.mark.skipif(not dali_available()[0], reason="nvidia.dali missing")),
    ("pil", 1),
    ("pil", 2),
])
def test_json_report_has_every_field_with_positive_rates(capsys, shards, decoder, threads):
    report = run_json(capsys, [shards, "--decoder", decoder, "--batch-size", "4", "--image-size", "32",
                               "--threads", str(threads), "--device", "cpu"])
    assert set(report) == {"decoder", "batch_size", "images", *RATES, "ratios", "device", "threads",
                           "image_size", "repeat", "cpu"}
    assert (report["decoder"], report["batch_size"], report["images"]) == (decoder, 4, 12)
    assert (report["device"], report["threads"], report["image_size"]) == ("cpu", threads, 32)
    assert all(report[rate] > 0 for rate in RATES)
    assert set(report["ratios"]) == {"read_vs_raw", "decode_vs_read", "augment_vs_read"}
    assert report["ratios"]["read_vs_raw"] == pytest.approx(report["read"] / report["raw_tar_read"], rel=1e-3)


def test_max_samples_caps_every_stage(shards):
    settings = bench.BenchSettings(shards, "pil", 4, "cpu", 1, 32, max_samples=5)
    assert bench.raw_tar_read(settings).images == 5
    assert bench.read_only(settings).images == 5
    assert bench.decode_stage(settings, "decode", train=False).images == 5


def test_two_image_samples_count_two_images(tmp_path):
    with tarfile.open(tmp_path / "pairs.tar", "w", format=tarfile.USTAR_FORMAT) as archive:
        for key in ("a", "b", "c"):
            add_member(archive, f"{key}.0.jpg", jpeg_bytes())
            add_member(archive, f"{key}.1.jpg", jpeg_bytes())
            add_member(archive, f"{key}.txt", b"the left image is red")
    settings = bench.BenchSettings(str(tmp_path / "pairs.tar"), "pil", 2, "cpu", 1, 32, None)
    assert [bench.raw_tar_read(settings).images, bench.read_only(settings).images] == [6, 6]
    assert bench.decode_stage(settings, "augment", train=True).images == 6


def test_table_names_each_stage(capsys, shards):
    assert bench.main([shards, "--decoder", "pil", "--batch-size", "4", "--image-size", "32"]) == 0
    table = capsys.readouterr().out
    labels = ("raw tar read (reference)", "read (ShardReader)", "read + decode", "read + decode + augment")
    assert all(label in table for label in labels)


def test_user_errors_give_one_message(capsys, tmp_path):
    assert bench.main(["", "--decoder", "pil"]) == 2
    assert capsys.readouterr().err.strip() == "bench: '' names no shard"
    assert bench.main([str(tmp_path / "missing.tar"), "--decoder", "pil"]) == 1
    assert "missing.tar" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert bench.main([str(tmp_path / "x.tar"), "--decoder", "dali", "--device", "gpu"]) == 2
        error = capsys.readouterr().err
        assert "--device gpu needs a CUDA GPU and torch sees none; use --device cpu" in error
