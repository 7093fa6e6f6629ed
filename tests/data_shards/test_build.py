"""Tests for ``python -m data_shards build``: data contract, boxes, rejects, determinism, resume, S3.

Run: ``.venv/bin/python -m pytest -q tests/data_shards/test_build.py``. Every test makes its own tiny
annotation files and PIL images under tmp_path; the S3 test uses the moto server of tests/conftest.py.
"""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_shards import build, storage

WDS2IDX = Path(sys.executable).parent / "wds2idx"
REPOSITORY = Path(__file__).resolve().parents[2]


def save_image(path: Path, size: tuple[int, int], seed: int = 0, image_format: str = "JPEG") -> Path:
    noise = random.Random(seed).randbytes(size[0] * size[1] * 3)  # noise: JPEGs far from trivially small
    Image.frombytes("RGB", size, noise).save(path, image_format)
    return path


def write_json(path: Path, value) -> str:
    path.write_text(json.dumps(value))
    return str(path)


def run_build(capsys, *arguments: str) -> tuple[int, str]:
    status = build.main(list(arguments))
    return status, capsys.readouterr().err


def read_tar(path) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(str(path)))) as archive:
        return [(member.name, archive.extractfile(member).read()) for member in archive]


def samples_of(path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for name, data in read_tar(path):
        key, extension = name.split(".", 1)
        samples.setdefault(key, {})[extension] = data
    return samples


def reference_index(tar_path: Path) -> str:
    index_path = tar_path.parent / "reference.idx"
    subprocess.run([str(WDS2IDX), str(tar_path), str(index_path)], check=True, capture_output=True)
    text = index_path.read_text()
    index_path.unlink()
    return text


@pytest.fixture
def captioned(tmp_path) -> tuple[str, str]:
    """An ALBEF annotation file over 10 good images and one PNG, and its image folder."""
    images = tmp_path / "images"
    images.mkdir()
    records = []
    for index in range(10):
        save_image(images / f"{index}.jpg", (32 + index, 24), seed=index)
        records.append({"image": f"{index}.jpg", "caption": [f"caption {index}", "second"]})
    save_image(images / "p.png", (20, 10), image_format="PNG")
    records.append({"image": "p.png", "caption": "a png"})
    return write_json(tmp_path / "train.json", records), str(images)


def test_output_contract_sizes_manifest_and_index(tmp_path, capsys, captioned):
    annotations, images = captioned
    out = tmp_path / "out"
    status, _ = run_build(capsys, "--input", annotations, "--format", "albef", "--image-root", images,
                          "--output", f"{out}/train-%06d.tar", "--samples-per-shard", "4")
    assert status == 0
    assert sorted(os.listdir(out)) == ["manifest.json", "sizes.json"] + [
        f"train-00000{index}.{suffix}" for index in range(3) for suffix in ("idx", "tar")]
    assert json.loads((out / "sizes.json").read_text()) == {
        "train-000000.tar": 4, "train-000001.tar": 4, "train-000002.tar": 3}
    for index in range(3):
        tar_path = out / f"train-00000{index}.tar"
        assert (out / f"train-00000{index}.idx").read_text() == reference_index(tar_path)
    first = samples_of(out / "train-000000.tar")
    assert list(first) == ["000000000", "000000001", "000000002", "000000003"]
    sample = first["000000001"]
    assert sorted(sample) == ["jpg", "json", "txt"]
    assert sample["jpg"] == Path(images, "1.jpg").read_bytes()  # small JPEGs are stored unchanged
    assert sample["txt"] == b"caption 1"
    assert json.loads(sample["json"]) == {"captions": ["caption 1", "second"], "width": 33, "height": 24,
                                          "source": "albef", "origin": "train.json#1"}
    last = samples_of(out / "train-000002.tar")
    assert last["000000010"]["png"] == Path(images, "p.png").read_bytes()
    assert [name for name, _ in read_tar(out / "train-000002.tar")][-3:] == [
        "000000010.json", "000000010.png", "000000010.txt"]
    manifest = json.loads((out / "manifest.json").read_text())
    counts = (manifest["records"], manifest["written"], manifest["rejected"], manifest["shards"])
    assert counts == (11, 11, 0, 3)
    assert manifest["total_bytes"] == sum(os.path.getsize(out / f"train-00000{i}.tar") for i in range(3))
    assert manifest["inputs"][0]["path"] == annotations
    assert manifest["arguments"]["samples_per_shard"] == 4


def test_boxes_rescaled_clipped_and_dropped(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    save_image(images / "big.jpg", (200, 100))
    save_image(images / "small.jpg", (60, 40), seed=1)
    elements = [{"caption": "inside", "bb": [20, 10, 60, 40]},      # -> [10, 5, 40, 25]
                {"caption": "overhang", "bb": [150, 50, 100, 100]},  # -> clipped to [75, 25, 100, 50]
                {"caption": "outside", "bb": [250, 0, 10, 10]},      # -> empty after clipping: dropped
                {"caption": "flat", "bb": [30, 30, 0, 10]},          # zero area: dropped
                {"caption": "corner", "bb": [-10, -10, 20, 20]}]     # -> clipped to [0, 0, 5, 5]
    lines = [{"image": "big.jpg", "caption": "boxes", "elems": elements},
             {"image": "small.jpg", "caption": "kept", "elems": [{"caption": "all", "bb": [0, 0, 60, 40]}]}]
    annotations = tmp_path / "regions.jsonl"
    annotations.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out"
    status, _ = run_build(capsys, "--input", str(annotations), "--format", "xvlm", "--image-root",
                          str(images), "--output", f"{out}/r-%06d.tar", "--samples-per-shard", "10",
                          "--resize-max-side", "100")
    assert status == 0
    samples = samples_of(out / "r-000000.tar")
    stored = Image.open(io.BytesIO(samples["000000000"]["jpg"]))
    assert (stored.format, stored.size) == ("JPEG", (100, 50))
    meta = json.loads(samples["000000000"]["json"])
    assert (meta["width"], meta["height"]) == (100, 50)
    assert [(region["text"], region["box"]) for region in meta["regions"]] == [
        ("inside", [10.0, 5.0, 40.0, 25.0]), ("overhang", [75.0, 25.0, 100.0, 50.0]),
        ("corner", [0.0, 0.0, 5.0, 5.0])]
    assert samples["000000001"]["jpg"] == (images / "small.jpg").read_bytes()  # not larger than 100
    assert json.loads(samples["000000001"]["json"])["regions"][0]["box"] == [0.0, 0.0, 60.0, 40.0]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["boxes"] == {"clipped": 2, "dropped": 2}
    assert manifest["inputs"][0]["boxes"] == {"clipped": 2, "dropped": 2}


def test_transparent_and_16_bit_images_are_stored_as_8_bit_rgb(tmp_path, capsys):
    """Transparent areas are laid on white (they used to keep the colour stored under them), 16-bit grey is
    scaled (it used to clip to white): losslessly as PNG, or as JPEG when resized. The full matrix of
    modes is in test_image_modes.py."""
    images = tmp_path / "images"
    images.mkdir()
    logo = Image.new("RGBA", (40, 20), (200, 30, 30, 0))  # left half transparent, right half opaque red
    logo.paste((200, 30, 30, 255), (20, 0, 40, 20))
    logo.save(images / "logo.png")
    Image.new("I;16", (40, 20), 32768).save(images / "grey16.png")
    annotations = write_json(tmp_path / "logos.json", [{"image": "logo.png", "caption": "a logo"},
                                                       {"image": "grey16.png", "caption": "mid-grey"}])
    # (resize option, stored member, format, logo size, grey levels each half's mean colour may be off:
    # Lanczos and 4:2:0 JPEG chroma blur the edge, 3.1 measured; an unmixed alpha would be 225 off)
    for resize, extension, image_format, size, levels in ((None, "png", "PNG", (40, 20), 0),
                                                          ("20", "jpg", "JPEG", (20, 10), 5)):
        out = tmp_path / f"out-{extension}"
        options = ["--resize-max-side", resize] if resize else []
        status, _ = run_build(capsys, "--input", annotations, "--format", "albef", "--image-root", str(images),
                              "--output", f"{out}/l-%06d.tar", "--samples-per-shard", "10", *options)
        assert status == 0
        samples = samples_of(out / "l-000000.tar")
        stored = Image.open(io.BytesIO(samples["000000000"][extension]))
        assert (stored.format, stored.mode, stored.size) == (image_format, "RGB", size)
        pixels = np.asarray(stored).astype(int)
        half = size[0] // 2
        assert np.abs(pixels[:, :half].mean(axis=(0, 1)) - 255).max() <= levels
        assert np.abs(pixels[:, half:].mean(axis=(0, 1)) - (200, 30, 30)).max() <= levels
        grey = Image.open(io.BytesIO(samples["000000001"][extension]))
        assert grey.format == image_format and set(grey.getdata()) == {(128, 128, 128)}


def test_refcoco_target_outside_rejects_and_proposals_are_cleaned(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    save_image(images / "r.jpg", (100, 80))
    records = [{"image": "r.jpg", "text": "the edge", "ref_id": 1, "bbox": [90, 70, 30, 30]},
               {"image": "r.jpg", "text": "nowhere", "ref_id": 2, "bbox": [120, 10, 10, 10]}]
    detections = write_json(tmp_path / "detections.json", {"r.jpg": [[0, 0, 10, 10], [200, 200, 5, 5]]})
    out = tmp_path / "out"
    status, _ = run_build(capsys, "--input", write_json(tmp_path / "refs.json", records), "--format",
                          "refcoco", "--image-root", str(images), "--output", f"{out}/g-%06d.tar",
                          "--samples-per-shard", "5", "--detections", detections,
                          "--max-reject-fraction", "0.5")
    assert status == 0
    meta = json.loads(samples_of(out / "g-000000.tar")["000000000"]["json"])
    assert meta["box"] == [90.0, 70.0, 100.0, 80.0]
    assert meta["proposals"] == [[0.0, 0.0, 10.0, 10.0]]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rejects"] == {"target box empty after clipping": 1}
    assert manifest["inputs"][0]["reject_examples"] == [
        {"origin": "refs.json#1", "reason": "target box empty after clipping",
         "detail": "[120.0, 10.0, 130.0, 20.0]"}]
    assert manifest["boxes"] == {"clipped": 1, "dropped": 1}


def test_two_image_samples_and_their_index(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    save_image(images / "left.jpg", (30, 20))
    save_image(images / "right.png", (10, 40), image_format="PNG")
    records = [{"images": ["left.jpg", "right.png"], "sentence": "left is wider", "label": "True"}]
    out = tmp_path / "out"
    status, _ = run_build(capsys, "--input", write_json(tmp_path / "pairs.json", records), "--format",
                          "nlvr2", "--image-root", str(images), "--output", f"{out}/n-%06d.tar",
                          "--samples-per-shard", "5")
    assert status == 0
    assert [name for name, _ in read_tar(out / "n-000000.tar")] == [
        "000000000.0.jpg", "000000000.1.png", "000000000.json", "000000000.txt"]
    meta = json.loads(samples_of(out / "n-000000.tar")["000000000"]["json"])
    assert (meta["width"], meta["height"], meta["label"]) == ([30, 10], [20, 40], True)
    index = (out / "n-000000.idx").read_text()
    assert index == reference_index(out / "n-000000.tar")
    assert index.splitlines()[1].startswith("0.jpg 512 ")


@pytest.fixture
def bad_data(tmp_path) -> tuple[str, str]:
    """4 good records and 6 bad ones: 2 missing images, a truncated JPEG, a non-image, an empty caption,
    and a malformed record."""
    images = tmp_path / "images"
    images.mkdir()
    records = []
    for index in range(4):
        save_image(images / f"{index}.jpg", (16, 16), seed=index)
        records.append({"image": f"{index}.jpg", "caption": f"good {index}"})
    whole = save_image(images / "whole.jpg", (64, 64), seed=9).read_bytes()
    (images / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (images / "text.jpg").write_text("not an image")
    records += [{"image": "gone.jpg", "caption": "missing"}, {"image": "gone2.jpg", "caption": "missing"},
                {"image": "truncated.jpg", "caption": "cut"}, {"image": "text.jpg", "caption": "garbage"},
                {"image": "0.jpg", "caption": "   "}, {"caption": "no image field"}]
    return write_json(tmp_path / "bad.json", records), str(images)


def test_bad_records_are_rejected_with_reasons(tmp_path, capsys, bad_data):
    annotations, images = bad_data
    out = tmp_path / "out"
    arguments = ["--input", annotations, "--format", "albef", "--image-root", images,
                 "--output", f"{out}/b-%06d.tar", "--samples-per-shard", "3"]
    status, _ = run_build(capsys, *arguments, "--max-reject-fraction", "0.6")
    assert status == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rejects"] == {"missing image": 2, "undecodable image": 2, "empty caption": 1,
                                   "malformed record: missing field 'image'": 1}
    entry = manifest["inputs"][0]
    assert (entry["records"], entry["written"], entry["rejected"]) == (10, 4, 6)
    examples = {example["origin"]: example for example in entry["reject_examples"]}
    assert examples["bad.json#6"]["reason"] == "undecodable image"
    assert "truncated" in examples["bad.json#6"]["detail"]
    assert examples["bad.json#4"]["detail"] == f"{images}/gone.jpg"
    assert sum(json.loads((out / "sizes.json").read_text()).values()) == 4

    status, errors = run_build(capsys, *arguments)  # default --max-reject-fraction 0.05
    assert status == 1
    assert errors.splitlines()[-1] == (
        "error: rejected 6 of 10 records (60.0%), more than --max-reject-fraction 0.05; worst reasons: "
        f"missing image (2), undecodable image (2), empty caption (1); examples in {out}/manifest.json")


def test_unreadable_inputs_and_bad_arguments_fail_at_start(tmp_path, capsys, captioned):
    annotations, images = captioned
    common = ["--format", "albef", "--image-root", images, "--samples-per-shard", "2"]
    status, errors = run_build(capsys, "--input", str(tmp_path / "nope.json"), *common,
                               "--output", f"{tmp_path}/o-%06d.tar")
    assert (status, errors) == (2, f"error: annotation file {tmp_path}/nope.json not found; check --input\n")
    status, errors = run_build(capsys, "--input", annotations, *common, "--output", f"{tmp_path}/o.tar")
    assert status == 2
    assert errors == (f"error: --output '{tmp_path}/o.tar' needs one %d-style field for the shard number and "
                      "a .tar ending, e.g. 'out/train-%06d.tar'\n")
    (tmp_path / "broken.json").write_text("[{")
    status, errors = run_build(capsys, "--input", str(tmp_path / "broken.json"), *common,
                               "--output", f"{tmp_path}/o-%06d.tar")
    assert status == 2
    assert errors.startswith(f"error: cannot read annotation file {tmp_path}/broken.json as albef:")
    assert not any(name.endswith(".tar") for name in os.listdir(tmp_path))


def test_deterministic_bytes_across_runs_and_worker_counts(tmp_path, capsys, captioned):
    annotations, images = captioned
    outputs = []
    for run, workers in enumerate(("1", "2")):
        out = tmp_path / f"out{run}"
        status, _ = run_build(capsys, "--input", annotations, "--format", "albef", "--image-root", images,
                              "--output", f"{out}/d-%06d.tar", "--samples-per-shard", "3", "--seed", "7",
                              "--workers", workers, "--resize-max-side", "34")
        assert status == 0
        outputs.append({name: (out / name).read_bytes() for name in os.listdir(out)
                        if name != "manifest.json"})
    assert outputs[0] == outputs[1]
    shards = [tmp_path / "out0" / name for name in sorted(outputs[0]) if name.endswith(".tar")]
    keys = [key for shard in shards for key in samples_of(shard)]
    assert sorted(keys) == [f"{index:09d}" for index in range(11)]
    assert keys != sorted(keys)  # --seed shuffled the assignment


def test_max_shard_bytes_groups_by_source_size(tmp_path, capsys, captioned):
    annotations, images = captioned
    sizes = [os.path.getsize(Path(images, f"{index}.jpg")) for index in range(3)]
    out = tmp_path / "out"
    status, _ = run_build(capsys, "--input", annotations, "--format", "albef", "--image-root", images,
                          "--output", f"{out}/m-%06d.tar", "--samples-per-shard", "100",
                          "--max-shard-bytes", str(sizes[0] + sizes[1]))
    assert status == 0
    counts = json.loads((out / "sizes.json").read_text())
    assert counts["m-000000.tar"] == 2 and sum(counts.values()) == 11 and max(counts.values()) <= 2


def test_resume_rebuilds_only_unfinished_shards(tmp_path, capsys, bad_data):
    annotations, images = bad_data
    out = tmp_path / "out"
    arguments = ["--input", annotations, "--format", "albef", "--image-root", images,
                 "--output", f"{out}/k-%06d.tar", "--samples-per-shard", "2", "--max-reject-fraction", "1"]
    assert run_build(capsys, *arguments)[0] == 0
    reference = {name: (out / name).read_bytes() for name in os.listdir(out)}
    first_manifest = json.loads(reference.pop("manifest.json"))
    (out / "k-000001.idx").unlink()                 # killed between writing the .tar and the .idx
    (out / "k-000002.tar").unlink()
    (out / "k-000002.idx").unlink()                 # never finished
    (out / ".k-000003.tar.x1y2z3.partial").write_bytes(b"half a shard")  # a killed atomic write
    old_time = time.time() - 1000
    os.utime(out / "k-000000.tar", (old_time, old_time))
    assert run_build(capsys, *arguments)[0] == 0
    assert os.path.getmtime(out / "k-000000.tar") == old_time  # finished shards are not rewritten
    resumed = {name: (out / name).read_bytes() for name in os.listdir(out)}
    manifest = json.loads(resumed.pop("manifest.json"))
    assert resumed == reference
    assert manifest["shards_skipped"] == 2 and first_manifest["shards_skipped"] == 0  # shards 0 and 3
    for field in ("records", "written", "rejected", "rejects", "boxes", "total_bytes"):
        assert manifest[field] == first_manifest[field], field
    assert manifest["inputs"][0]["reject_examples"] == first_manifest["inputs"][0]["reject_examples"]


def test_resume_refuses_shards_of_another_build(tmp_path, capsys, captioned):
    annotations, images = captioned
    arguments = ["--input", annotations, "--format", "albef", "--image-root", images,
                 "--output", f"{tmp_path}/out/f-%06d.tar", "--samples-per-shard", "3"]
    assert run_build(capsys, *arguments)[0] == 0
    status, errors = run_build(capsys, *arguments, "--seed", "1")
    assert status == 2
    assert errors.splitlines()[-1] == (
        f"error: {tmp_path}/out/f-000000.tar exists but was built from other inputs or options "
        "(key 000000000); remove the output or choose another --output")


def test_build_to_s3(tmp_path, capsys, captioned, s3_bucket):
    annotations, images = captioned
    arguments = ["--input", annotations, "--format", "albef", "--image-root", images,
                 "--samples-per-shard", "4", "--workers", "2"]
    prefix = f"s3://{s3_bucket}/shards"
    assert run_build(capsys, *arguments, "--output", f"{prefix}/s-%06d.tar")[0] == 0
    assert run_build(capsys, *arguments, "--output", f"{tmp_path}/local/s-%06d.tar")[0] == 0
    names = ["s-000000.idx", "s-000000.tar", "s-000001.idx", "s-000001.tar", "s-000002.idx", "s-000002.tar"]
    listed = [f"{prefix}/{name}" for name in ["manifest.json", *names, "sizes.json"]]
    assert storage.list_dir(prefix) == listed
    for name in [*names, "sizes.json"]:
        assert storage.read_bytes(f"{prefix}/{name}") == (tmp_path / "local" / name).read_bytes(), name
    manifest = json.loads(storage.read_bytes(f"{prefix}/manifest.json"))
    assert (manifest["written"], manifest["shards_skipped"]) == (11, 0)
    assert run_build(capsys, *arguments, "--output", f"{prefix}/s-%06d.tar")[0] == 0
    assert json.loads(storage.read_bytes(f"{prefix}/manifest.json"))["shards_skipped"] == 3


def test_all_rejected_shard_is_written_empty_and_reported(tmp_path, capsys, bad_data):
    annotations, images = bad_data
    out = tmp_path / "out"
    status, errors = run_build(capsys, "--input", annotations, "--format", "albef", "--image-root", images,
                               "--output", f"{out}/e-%06d.tar", "--samples-per-shard", "2",
                               "--max-reject-fraction", "1")
    assert status == 0
    assert errors.splitlines()[-1] == (
        "warning: every record of e-000002.tar, e-000003.tar was rejected; these shards are empty and DALI "
        "refuses their indexes, so leave them out of DALI readers")
    manifest = json.loads((out / "manifest.json").read_text())
    # planned pairs: (0, 1) (2, 3) (gone, gone2) (truncated, text); the adapter already dropped the rest
    assert manifest["empty_shards"] == ["e-000002.tar", "e-000003.tar"]
    assert (out / "e-000002.idx").read_text() == "v1.2 0\n"
    assert json.loads((out / "sizes.json").read_text()) == {
        "e-000000.tar": 2, "e-000001.tar": 2, "e-000002.tar": 0, "e-000003.tar": 0}
    assert read_tar(out / "e-000002.tar") == []


def test_two_builds_in_one_folder_share_sizes_json(tmp_path, capsys, captioned):
    annotations, images = captioned
    output = tmp_path / "out"
    for name, per_shard in (("one", "11"), ("two", "4")):
        status, _ = run_build(capsys, "--input", annotations, "--format", "albef", "--image-root", images,
                              "--output", str(output / f"{name}-%06d.tar"), "--samples-per-shard", per_shard)
        assert status == 0
    assert json.loads((output / "sizes.json").read_text()) == {
        "one-000000.tar": 11, "two-000000.tar": 4, "two-000001.tar": 4, "two-000002.tar": 3}
