"""The standing bad-input matrix of the data side: each case, the exact outcome, and nothing good lost.

Every case runs the real code on a tiny input made here: the builder through ``python -m data_shards
build``'s ``main``, the reader, or the source checks the training entry points run first. A builder case
pins the manifest's reject reason with its detail (or the error message's key words) and that every
good record of the same input was written. Run: ``.venv/bin/python -m pytest -q
tests/data_shards/test_bad_input.py`` (S3 cases use the moto server of tests/conftest.py).
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
import warnings
from pathlib import Path

import pytest
from PIL import Image

from data_shards import storage
from data_shards.__main__ import main as data_shards_main
from data_shards.reader import ShardReader, Source
from data_shards.shard_samples import SampleRejected, read_image_bytes
from data_shards.sizes import NoShards, SizesUnknown, check_sources, samples_in
from data_shards.tar_samples import SKIP_TRUNCATED, SKIP_VANISHED_SHARD
from tests.data_shards.shard_factory import write_dataset, write_shard
from tests.data_shards.test_build import REPOSITORY, samples_of, save_image, write_json

REFUSED = "image reference not allowed"


def jpeg(path: Path, size=(40, 30)) -> Path:
    Image.new("RGB", size, (120, 40, 200)).save(path, "JPEG")
    return path


@pytest.fixture
def images(tmp_path) -> Path:
    """An image root with good.jpg and sub/good2.jpg, and a readable JPEG just outside it."""
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    jpeg(root / "good.jpg")
    jpeg(root / "sub" / "good2.jpg")
    jpeg(tmp_path / "outside.jpg")
    return root


def build(capsys, tmp_path: Path, fmt: str, records, *options: str, image_root: str | None = None,
          name: str = "input.json", output: str = "out") -> tuple[int, str, dict | None]:
    """Run the builder on records (a list, or raw bytes for the file) into tmp_path/output;
    (status, stderr, manifest or None)."""
    annotations = tmp_path / name
    if isinstance(records, bytes):
        annotations.write_bytes(records)
    elif name.endswith(".jsonl"):
        annotations.write_text("".join(json.dumps(record) + "\n" for record in records))
    else:
        annotations.write_text(json.dumps(records))
    out = tmp_path / output
    status = data_shards_main(["build", "--input", str(annotations), "--format", fmt, "--image-root",
                               image_root or str(tmp_path / "images"), "--output", f"{out}/s-%06d.tar",
                               "--samples-per-shard", "50", "--max-reject-fraction", "1", *options])
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else None
    return status, capsys.readouterr().err, manifest


def written_origins(out: Path) -> list[str]:
    return [json.loads(members["json"])["origin"] for shard in sorted(out.glob("*.tar"))
            for members in samples_of(shard).values()]


def examples(manifest: dict) -> list[tuple[str, str, str]]:
    return [(item["origin"], item["reason"], item["detail"]) for item in manifest["inputs"][0]["reject_examples"]]


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# -- image references from annotation data ------------------------------------------------------------------


def record_for(fmt: str, field: str, value: str, good: str) -> dict:
    """A record of ``fmt`` whose image ``field`` holds ``value`` (its other image, if any, is ``good``)."""
    records = {
        "albef": {"image": value, "caption": "c"},
        "coco": {"image": value, "caption": "c"},
        "caption": {"image": value, "caption": "c"},
        "vicha": {"image": value, "caption": "c", "kwords": ["red"]},
        "xvlm": {field: value, "caption": "c", "elems": [{"caption": "r", "bb": [1, 1, 4, 4]}]},
        "pevl": {field: value, "caption": "red", "tokens_positive": [[0, 3]], "bbox_list": [[1, 1, 4, 4]]},
        "vqa": {"question_id": 1, "question": "q?", "answer": ["a"], "image": value},
        "nlvr2": {"images": [good, value] if field == "images[1]" else [value, good], "sentence": "s",
                  "label": "True"},
        "ve": {"image": value, "sentence": "s", "label": "neutral"},
        "refcoco": {"image": value, "text": "t", "ref_id": 1, "bbox": [1, 1, 4, 4]},
    }
    return records[fmt]


IMAGE_FIELDS = [("albef", "image"), ("coco", "image"), ("caption", "image"), ("vicha", "image"),
                ("xvlm", "image"), ("xvlm", "image_rpath"), ("pevl", "image"), ("pevl", "file_name"),
                ("vqa", "image"), ("nlvr2", "images[0]"), ("nlvr2", "images[1]"), ("ve", "image"),
                ("refcoco", "image")]


@pytest.mark.parametrize(("fmt", "field"), IMAGE_FIELDS, ids=[f"{f}-{g}" for f, g in IMAGE_FIELDS])
def test_pipe_command_in_any_image_field_is_refused_and_never_run(tmp_path, capsys, images, fmt, field):
    marker = tmp_path / "command-ran"
    value = f"pipe:touch {marker}; cat {images}/good.jpg #://"
    options = []
    if fmt == "refcoco":  # the detections file is keyed by the same data string
        options = ["--detections", write_json(tmp_path / "dets.json", {value: [[0, 0, 2, 2]]})]
    records = [record_for(fmt, field, "good.jpg", "good.jpg"), record_for(fmt, field, value, "good.jpg")]
    status, _, manifest = build(capsys, tmp_path, fmt, records, *options)
    assert status == 0 and not marker.exists()
    assert manifest["rejects"] == {REFUSED: 1}
    (origin, reason, detail), = examples(manifest)
    shown = value + ".jpg" if fmt == "ve" else value  # ve adds the extension Flickr ids lack
    assert (origin, reason) == ("input.json#1", REFUSED)
    assert detail == f"{shown!r}: pipe: commands come only from configuration, never from data"
    assert written_origins(tmp_path / "out") == ["input.json#0"]


REFERENCES = [  # (image string, where {root} is the image root and {outside} a JPEG beside it; detail or None)
    ("absolute-outside", "{outside}", "'{outside}' lies outside --image-root {root}"),
    ("dotdot-outside", "../outside.jpg", "'../outside.jpg' leads outside --image-root {root}"),
    ("dotdot-deep-outside", "sub/../../outside.jpg", "'sub/../../outside.jpg' leads outside --image-root {root}"),
    ("file-url-outside", "file://{outside}", "'{outside}' lies outside --image-root {root}"),
    ("http", "http://example.invalid/a.jpg", "'http://example.invalid/a.jpg': 'http:' is not a readable image "
     "location; give a path under --image-root or an s3:// or hdfs:// URL"),
    ("scheme-like-name", "gs:x.jpg", "'gs:x.jpg': 'gs:' is not a readable image location; give a path under "
     "--image-root or an s3:// or hdfs:// URL"),
    ("s3-without-opt-in", "s3://bucket/a.jpg", "'s3://bucket/a.jpg': s3:// images outside --image-root are read "
     "only with --allow-image-scheme s3"),
    ("hdfs-without-opt-in", "hdfs://nn/a.jpg", "'hdfs://nn/a.jpg': hdfs:// images outside --image-root are read "
     "only with --allow-image-scheme hdfs"),
    ("nul-byte", "good.jpg\x00.png", "'good.jpg\\x00.png' contains a control character"),
    ("absolute-inside", "{root}/sub/good2.jpg", None),
    ("dotdot-inside", "sub/../good.jpg", None),
    ("file-url-inside", "file://{root}/good.jpg", None),
]


@pytest.mark.parametrize(("image", "detail"), [case[1:] for case in REFERENCES], ids=[c[0] for c in REFERENCES])
def test_image_references_stay_under_the_root(tmp_path, capsys, images, image, detail):
    values = {"root": str(images), "outside": str(tmp_path / "outside.jpg")}
    records = [{"image": "good.jpg", "caption": "kept"}, {"image": image.format(**values), "caption": "probe"}]
    status, _, manifest = build(capsys, tmp_path, "albef", records)
    assert status == 0
    if detail is None:
        assert manifest["rejects"] == {} and written_origins(tmp_path / "out") == ["input.json#0", "input.json#1"]
    else:
        assert examples(manifest) == [("input.json#1", REFUSED, detail.format(**values))]
        assert written_origins(tmp_path / "out") == ["input.json#0"]


def test_s3_images_need_the_opt_in_and_an_s3_image_root_keeps_working(tmp_path, capsys, images, s3_bucket):
    data = (images / "good.jpg").read_bytes()
    for key in ("root/a.jpg", "elsewhere/b.jpg"):
        with storage.atomic_write(f"s3://{s3_bucket}/{key}") as sink:
            sink.write(data)
    records = [{"image": "good.jpg", "caption": "local"},
               {"image": f"s3://{s3_bucket}/elsewhere/b.jpg", "caption": "s3"}]
    status, _, manifest = build(capsys, tmp_path, "albef", records, "--allow-image-scheme", "s3")
    assert (status, manifest["rejects"]) == (0, {})
    assert written_origins(tmp_path / "out") == ["input.json#0", "input.json#1"]

    remote = [{"image": "a.jpg", "caption": "under the root"}, {"image": "../elsewhere/b.jpg", "caption": "above"}]
    status, _, manifest = build(capsys, tmp_path, "albef", remote, image_root=f"s3://{s3_bucket}/root",
                                output="from-s3")
    assert status == 0
    assert examples(manifest) == [("input.json#1", REFUSED,
                                   f"'../elsewhere/b.jpg' leads outside --image-root s3://{s3_bucket}/root")]
    assert manifest["written"] == 1


def test_a_pipe_url_reaching_the_image_reader_is_refused_there_too(tmp_path):
    marker = tmp_path / "command-ran"
    with pytest.raises(SampleRejected) as caught:
        read_image_bytes(f"pipe:touch {marker} #://")
    assert caught.value.reason == REFUSED and "pipe: commands come only from configuration" in caught.value.detail
    with pytest.raises(ValueError, match="it comes from data, and pipe: commands come only from configuration"):
        storage.read_data_bytes(f"pipe:touch {marker}")
    assert not marker.exists()
    assert storage.read_bytes(f"pipe:touch {marker}") == b""  # configured pipes still run
    assert marker.exists()


# -- annotation files and records -----------------------------------------------------------------------------


def test_jsonl_bad_lines_are_counted_with_their_line_numbers(tmp_path, capsys, images):
    lines = [b'{"image": "good.jpg", "caption": "one"}', b'{"image": "good.jpg", "caption": ', b"",
             b'{"image": "good.jpg", "caption": "caf\xe9 latin-1"}', b'{"image": "sub/good2.jpg", "caption": "two"}']
    status, _, manifest = build(capsys, tmp_path, "albef", b"\n".join(lines) + b"\n", name="input.jsonl")
    assert status == 0
    assert examples(manifest) == [
        ("input.jsonl#1", "invalid JSON line", "line 2: Expecting value at column 34"),
        ("input.jsonl#2", "invalid JSON line", "line 4: not UTF-8 (byte 0xe9 at column 38)")]
    assert written_origins(tmp_path / "out") == ["input.jsonl#0", "input.jsonl#3"]


FILE_ERRORS = [  # (annotation file bytes, the error line's key words)
    ("not-json", b"[{", "is not valid JSON"),
    ("not-utf8-json", b'[{"image": "\xff"}]', "is not valid JSON"),
    ("top-level-object", b'{"image": "good.jpg"}', "must hold a JSON list of records, found a JSON dict"),
    ("empty-list", b"[]", "no records in"),
]


@pytest.mark.parametrize(("content", "words"), [case[1:] for case in FILE_ERRORS], ids=[c[0] for c in FILE_ERRORS])
def test_unreadable_annotation_files_stop_the_build_naming_the_file(tmp_path, capsys, images, content, words):
    status, errors, manifest = build(capsys, tmp_path, "albef", content)
    assert (status, manifest) == (2, None)
    assert errors.startswith("error: ") and str(tmp_path / "input.json") in errors and words in errors
    assert not (tmp_path / "out").exists()


def test_records_of_the_wrong_shape_or_type_are_rejected_with_their_reason(tmp_path, capsys, images):
    records = [{"image": "good.jpg", "caption": "fine"}, 7, ["good.jpg", "c"], {"image": 3, "caption": "c"},
               {"image": "good.jpg", "caption": {"text": "c"}}, {"caption": "no image"}, None,
               {"image": "absent.jpg", "caption": "missing image"}, {"image": "good.jpg", "caption": ""},
               {"image": "good.jpg", "caption": "  \t\n"}, {"image": "good.jpg", "caption": 5},
               {"image": "good.jpg", "caption": [" ", ""]}, {"image": "sub/good2.jpg", "caption": ["", "last"]}]
    status, _, manifest = build(capsys, tmp_path, "albef", records)
    assert status == 0
    assert manifest["rejects"] == {
        "malformed record: not a JSON object": 3, "empty caption": 3,
        "malformed record: field 'caption' must be a string or a list of strings": 2,
        "malformed record: field 'image' must be a non-empty string": 1,
        "malformed record: missing field 'image'": 1, "missing image": 1}
    assert ("input.json#7", "missing image", f"{images}/absent.jpg") in examples(manifest)
    assert written_origins(tmp_path / "out") == ["input.json#0", "input.json#12"]


def test_bad_boxes_are_clipped_dropped_or_rejected(tmp_path, capsys, images):
    elements = [{"caption": "inside", "bb": [2, 2, 10, 10]}, {"caption": "outside", "bb": [100, 100, 5, 5]},
                {"caption": "zero area", "bb": [5, 5, 0, 4]}, {"caption": "negative corner", "bb": [-5, -5, 10, 10]},
                {"caption": "negative size", "bb": [10, 10, -5, 5]}]
    records = [{"image": "good.jpg", "caption": "boxes", "elems": elements},
               {"image": "good.jpg", "caption": "nan", "elems": [{"caption": "r", "bb": [float("nan"), 0, 1, 1]}]},
               {"image": "good.jpg", "caption": "text", "elems": [{"caption": "r", "bb": ["1", 0, 1, 1]}]},
               {"image": "good.jpg", "caption": "short", "elems": [{"caption": "r", "bb": [1, 2, 3]}]}]
    status, _, manifest = build(capsys, tmp_path, "xvlm", records)
    assert status == 0
    assert manifest["rejects"] == {"malformed record: field 'bb' must be a list of 4 numbers": 3}
    assert manifest["boxes"] == {"clipped": 1, "dropped": 3}
    (members,) = samples_of(tmp_path / "out" / "s-000000.tar").values()
    assert [(region["text"], region["box"]) for region in json.loads(members["json"])["regions"]] == [
        ("inside", [2.0, 2.0, 12.0, 12.0]), ("negative corner", [0.0, 0.0, 5.0, 5.0])]


def test_a_target_box_outside_the_image_rejects_its_record(tmp_path, capsys, images):
    records = [{"image": "good.jpg", "text": "kept", "ref_id": 1, "bbox": [1, 1, 4, 4]},
               {"image": "good.jpg", "text": "gone", "ref_id": 2, "bbox": [50, 50, 4, 4]}]
    status, _, manifest = build(capsys, tmp_path, "refcoco", records)
    assert status == 0
    assert examples(manifest) == [("input.json#1", "target box empty after clipping", "[50.0, 50.0, 54.0, 54.0]")]
    assert written_origins(tmp_path / "out") == ["input.json#0"]


# -- builder arguments and output -----------------------------------------------------------------------------


CONFIG_ERRORS = [  # (option, value; the whole error line, {tmp} the test folder)
    ("--image-root", "pipe:cat images.tar",
     "error: --image-root 'pipe:cat images.tar': use a local folder or an s3:// or hdfs:// URL"),
    ("--output", "pipe:cat > {tmp}/s-%06d.tar",
     "error: --output 'pipe:cat > {tmp}/s-%06d.tar': shards are written to a local path or an s3:// URL"),
]


@pytest.mark.parametrize(("option", "value", "line"), CONFIG_ERRORS, ids=["pipe-image-root", "pipe-output"])
def test_pipe_is_no_image_root_or_output(tmp_path, capsys, images, option, value, line):
    annotations = write_json(tmp_path / "input.json", [{"image": "good.jpg", "caption": "c"}])
    arguments = {"--image-root": str(images), "--output": f"{tmp_path}/out/s-%06d.tar"}
    arguments[option] = value.format(tmp=tmp_path)
    status = data_shards_main(["build", "--input", annotations, "--format", "albef", "--samples-per-shard", "5",
                               *[item for pair in arguments.items() for item in pair]])
    assert (status, capsys.readouterr().err) == (2, line.format(tmp=tmp_path) + "\n")


def test_a_misspelt_format_lists_the_known_ones(tmp_path, capsys, images):
    with pytest.raises(SystemExit) as caught:
        build(capsys, tmp_path, "albfe", [{"image": "good.jpg", "caption": "c"}])
    assert caught.value.code == 2
    errors = capsys.readouterr().err
    assert "argument --format: invalid choice: 'albfe' (choose from " in errors and "albef" in errors


def test_an_unwritable_output_says_so_without_the_resume_hint(tmp_path, capsys, images):
    folder = "/sys/vlp-deepspeed-bad-input"  # refused even to root (sysfs)
    if not os.path.isdir("/sys") or os.path.exists(folder):
        pytest.skip("needs Linux sysfs to stand for a location nobody may write")
    annotations = write_json(tmp_path / "input.json", [{"image": "good.jpg", "caption": "c"}])
    status = data_shards_main(["build", "--input", annotations, "--format", "albef", "--image-root", str(images),
                               "--output", f"{folder}/s-%06d.tar", "--samples-per-shard", "5"])
    errors = capsys.readouterr().err
    assert status == 2
    assert errors in (f"error: cannot write to {folder}: permission denied; choose a writable --output\n",
                      f"error: cannot write to {folder}: read-only file system; choose a writable --output\n")


def test_output_to_a_missing_bucket_is_named_and_an_unreachable_store_keeps_the_resume_hint(
        tmp_path, capsys, images, s3_bucket, monkeypatch):
    annotations = write_json(tmp_path / "input.json", [{"image": "good.jpg", "caption": "c"}])
    common = ["build", "--input", annotations, "--format", "albef", "--image-root", str(images),
              "--samples-per-shard", "5"]
    status = data_shards_main([*common, "--output", f"s3://{s3_bucket}-absent/out/s-%06d.tar"])
    assert (status, capsys.readouterr().err) == (
        2, f"error: cannot write to s3://{s3_bucket}-absent/out: no such bucket; choose a writable --output\n")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{unused_port()}")
    status = data_shards_main([*common, "--output", f"s3://{s3_bucket}/out/s-%06d.tar"])
    errors = capsys.readouterr().err
    assert status == 1 and errors.startswith("error: Could not connect to the endpoint URL")
    assert errors.endswith("; re-run the same command to resume (finished shards are kept)\n")


def test_foreign_files_in_the_output_folder(tmp_path, capsys, images):
    out = tmp_path / "out"
    out.mkdir()
    (out / "sizes.json").write_text("[1, 2]")  # not {name: count}: rewritten, as unreadable JSON is
    records = [{"image": "good.jpg", "caption": "c"}]
    status, _, manifest = build(capsys, tmp_path, "albef", records)
    assert (status, manifest["written"]) == (0, 1)
    assert json.loads((out / "sizes.json").read_text()) == {"s-000000.tar": 1}
    (out / "s-000000.idx").write_bytes(b"\xff not an index")
    status, errors, _ = build(capsys, tmp_path, "albef", records)
    line = errors.splitlines()[-1]
    assert status == 2 and line.startswith(f"error: {out}/s-000000.idx is not a DALI index this builder wrote (")
    assert line.endswith("); remove it or choose another --output")


def test_killed_build_resumes_to_the_same_shards(tmp_path):
    images = tmp_path / "large"
    images.mkdir()
    records = []
    for index in range(24):  # big enough that resizing each takes a while, so the kill lands mid-build
        save_image(images / f"{index}.jpg", (1200, 1000), seed=index)
        records.append({"image": f"{index}.jpg", "caption": f"large {index}"})
    annotations = write_json(tmp_path / "large.json", records)
    command = [sys.executable, "-m", "data_shards", "build", "--input", annotations, "--format", "albef",
               "--image-root", str(images), "--samples-per-shard", "1", "--resize-max-side", "300"]
    out, reference = tmp_path / "out", tmp_path / "reference"
    process = subprocess.Popen([*command, "--output", f"{out}/l-%06d.tar"], cwd=REPOSITORY,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (out / "l-000001.idx").exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = [name for name in os.listdir(out) if name.endswith(".idx")]
    assert 2 <= len(finished) < 24 and not (out / "sizes.json").exists()
    subprocess.run([*command, "--output", f"{out}/l-%06d.tar"], cwd=REPOSITORY, check=True,
                   capture_output=True)
    subprocess.run([*command, "--output", f"{reference}/l-%06d.tar"], cwd=REPOSITORY, check=True,
                   capture_output=True)
    names = sorted(name for name in os.listdir(reference) if name != "manifest.json")
    assert sorted(name for name in os.listdir(out) if name != "manifest.json") == names  # no leftovers
    assert all((out / name).read_bytes() == (reference / name).read_bytes() for name in names)
    keys = [key for name in names if name.endswith(".tar") for key in samples_of(out / name)]
    assert keys == [f"{index:09d}" for index in range(24)]


# -- reading shards -------------------------------------------------------------------------------------------


def test_truncated_and_empty_tars_are_counted_and_the_rest_is_read(tmp_path):
    good = write_shard(tmp_path / "good.tar", ["g0", "g1"])
    (tmp_path / "cut.tar").write_bytes(good.read_bytes()[:4300])  # inside the second sample's image
    (tmp_path / "zero-bytes.tar").write_bytes(b"")
    with tarfile.open(tmp_path / "no-members.tar", "w"):
        pass
    urls = [str(tmp_path / name) for name in ("cut.tar", "zero-bytes.tar", "no-members.tar", "good.tar")]
    reader = ShardReader(urls, shard_shuffle=False)
    assert [sample["__key__"] for sample in reader] == ["g0", "g0", "g1"]
    assert reader.skipped == {SKIP_TRUNCATED: 2}  # the cut shard and the zero-byte one; no members is no error


def test_a_closed_s3_endpoint_is_named(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{unused_port()}")
    with pytest.raises(storage.SourceUnreachable, match=r"^could not open s3://bucket/a-000000.tar after 1 "
                                                        r"attempts: Could not connect to the endpoint URL"):
        list(ShardReader("s3://bucket/a-000000.tar", retries=1))


def test_exact_mode_fails_on_a_missing_shard_naming_it(tmp_path):
    write_dataset(tmp_path, num_shards=1, per_shard=2)
    missing = str(tmp_path / "train-000001.tar")
    reader = ShardReader(f"{tmp_path}/train-{{000000..000001}}.tar", shard_shuffle=False, retries=1)
    with pytest.raises(storage.SourceNotFound, match=f"^could not open {missing} after 1 attempts"):
        list(reader)


def test_resampled_mode_skips_a_vanished_shard_once_and_stops_when_none_is_left(tmp_path):
    write_dataset(tmp_path / "a", num_shards=3, per_shard=2, prefix="a")
    write_dataset(tmp_path / "b", num_shards=1, per_shard=2, prefix="b")
    sources = [Source(f"{tmp_path}/a/a-{{000000..000002}}.tar"), Source(f"{tmp_path}/b/b-000000.tar")]
    reader = ShardReader(sources, mode="resampled", seed=0, retries=1)
    stream = iter(reader)
    next(stream)
    reading = reader.snapshot()["shard"]
    vanished = next(path for path in sorted(tmp_path.glob("a/*.tar")) if str(path) != reading)
    vanished.unlink()  # deleted while the run goes on
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        shards = {os.path.basename(next(stream)["__url__"]) for _ in range(200)}
    left = {"a-000000.tar", "a-000001.tar", "a-000002.tar", "b-000000.tar"} - {vanished.name}
    assert shards == left  # both sources' other shards keep coming
    assert reader.skipped == {SKIP_VANISHED_SHARD: 1}
    assert [str(warning.message) for warning in caught] == [
        f"shard {vanished} was not found (deleted or moved during the run?); resampled reading skips it from now on"]
    state = reader.state_dict()
    assert state["slots"][0]["vanished"] == [str(vanished)]  # a resumed run does not look for it again

    resumed = ShardReader(sources, mode="resampled", seed=0, retries=1)
    resumed.load_state_dict(state)
    for path in [*tmp_path.glob("a/*.tar"), *tmp_path.glob("b/*.tar")]:
        path.unlink()
    with pytest.warns(RuntimeWarning), pytest.raises(storage.SourceNotFound) as error:
        list(resumed)
    assert str(error.value) == (
        f"no shard of '{sources[0].urls}', '{sources[1].urls}' can be read any more: all 4 were not found (deleted "
        "or moved since the run started); restore them or point data.train at shards that exist")
    assert resumed.skipped[SKIP_VANISHED_SHARD] == 4


# -- what the training entry points check before they start ---------------------------------------------------


@pytest.mark.parametrize("mode", ["exact", "resampled"])
def test_a_pattern_that_matches_nothing_is_named_up_front(tmp_path, mode):
    pattern = f"{tmp_path}/x-{{000000..000009}}.tar"
    with pytest.raises(NoShards) as caught:
        check_sources([pattern], mode=mode)
    assert str(caught.value) == (f"shard pattern {pattern!r} matches no file (10 name(s) tried, e.g. "
                                 f"{tmp_path}/x-000000.tar); check the folder, the name and the brace range")
    write_dataset(tmp_path / "real", num_shards=2, per_shard=1)
    typo = f"{tmp_path}/rael/train-{{000000..000001}}.tar"
    with pytest.raises(NoShards, match="matches no file"):
        check_sources([f"{tmp_path}/real/train-{{000000..000001}}.tar::{typo}"], mode=mode)


def test_some_missing_shards_fail_exact_mode_and_warn_in_resampled(tmp_path):
    write_dataset(tmp_path, num_shards=2, per_shard=1)
    pattern = f"{tmp_path}/train-{{000000..000003}}.tar"
    with pytest.raises(NoShards, match=r"2 of 4 shards of .* do not exist \(first: .*train-000002.tar\); exact mode"):
        check_sources(pattern, mode="exact")
    with pytest.warns(RuntimeWarning, match="resampled reading skips them"):
        check_sources(pattern, mode="resampled")


def test_an_s3_prefix_without_objects_is_named_up_front(s3_bucket):
    pattern = f"s3://{s3_bucket}/nothing/x-{{000000..000003}}.tar"
    with pytest.raises(NoShards, match=r"matches no object \(4 name\(s\) tried"):
        check_sources(pattern, mode="resampled")
    with storage.atomic_write(f"s3://{s3_bucket}/nothing/x-000002.tar") as sink:
        sink.write(b"")
    with pytest.warns(RuntimeWarning, match=r"3 of 4 shards of .* do not exist \(first: .*x-000000.tar\)"):
        check_sources(pattern, mode="resampled")  # the first is missing, a later one is there
    with pytest.raises(NoShards, match=f"bucket '{s3_bucket}-absent' does not exist"):
        check_sources(f"s3://{s3_bucket}-absent/x.tar")


def test_a_configured_pipe_runs_as_written_and_its_count_must_be_configured(tmp_path):
    write_dataset(tmp_path, num_shards=1, per_shard=2)
    (tmp_path / "sizes.json").write_text(json.dumps({"train-000000.tar": 2}))
    log = tmp_path / "commands"
    url = f"pipe:echo ran >> {log}; cat {tmp_path}/train-000000.tar"
    with pytest.raises(SizesUnknown) as caught:
        samples_in(url)
    assert str(caught.value) == (f"{url!r} is a pipe: command, which is run exactly as configured and has no "
                                 "folder to hold a sizes.json; set data.samples_per_epoch")
    assert not log.exists()  # no '; cat .../sizes.json' was appended and run
    check_sources(url)  # a command cannot be checked without running it
    assert [sample["__key__"] for sample in ShardReader(url)] == ["s000k0000", "s000k0001"]
    assert log.read_text() == "ran\n"
    with pytest.raises(ValueError, match="a pipe: command has no folder"):
        storage.parent(url)
    with pytest.raises(ValueError, match="a pipe: command has no folder"):
        storage.join(f"pipe:cat {tmp_path}", "sizes.json")


SIZES_ERRORS = [  # (sizes.json content, the message after its path)
    ("[3]", " does not hold {shard name: sample count}; rebuild the shards or set data.samples_per_epoch"),
    ('{"train-000000.tar": "2"}', ": the entry for train-000000.tar is '2', not a sample count; rebuild the shards "
     "or set data.samples_per_epoch"),
    ('{"other.tar": 2}', " has no entry for train-000000.tar; set data.samples_per_epoch"),
]


@pytest.mark.parametrize(("content", "message"), SIZES_ERRORS, ids=["not-a-mapping", "not-a-count", "no-entry"])
def test_a_bad_sizes_json_is_named(tmp_path, content, message):
    write_dataset(tmp_path, num_shards=1, per_shard=2)
    (tmp_path / "sizes.json").write_text(content)
    with pytest.raises(SizesUnknown) as caught:
        samples_in(f"{tmp_path}/train-000000.tar")
    assert str(caught.value) == f"{tmp_path}/sizes.json{message}"


def test_the_loader_reads_what_the_checks_let_through(tmp_path):
    """The good path of the same inputs: a real pattern passes the checks, counts and reads in full."""
    write_dataset(tmp_path, num_shards=2, per_shard=3)
    (tmp_path / "sizes.json").write_text(json.dumps({"train-000000.tar": 3, "train-000001.tar": 3}))
    pattern = f"{tmp_path}/train-{{000000..000001}}.tar"
    check_sources(pattern)
    assert samples_in(pattern) == 6 == len(list(ShardReader(pattern)))
    assert io.BytesIO(next(iter(ShardReader(pattern)))["jpg"]).read(2) == b"\xff\xd8"
