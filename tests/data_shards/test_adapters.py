"""Tests for data_shards/adapters.py: every source format, box conversions, exact reject reasons, file errors.

Run: ``.venv/bin/python -m pytest -q tests/data_shards/test_adapters.py``.
"""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest

from data_shards import synth
from data_shards.adapters import FORMATS, AnnotationFileError, Reject, SourceRecord, iter_records

SYNTH_FILES = [("albef", "pretrain_albef.json"), ("xvlm", "pretrain_xvlm_regions.json"),
               ("pevl", "pretrain_pevl_grounding.json"), ("vicha", "pretrain_vicha_kwords.json")] + [
    (fmt, f"{prefix}_{split}.json") for split in ("train", "val", "test")
    for fmt, prefix in (("coco", "retrieval"), ("caption", "caption"), ("vqa", "vqa"), ("nlvr2", "nlvr2"),
                        ("ve", "ve"), ("refcoco", "refcoco"))]


def write(tmp_path, records, name: str = "input.json") -> str:
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    else:
        path.write_text(json.dumps(records), encoding="utf-8")
    return str(path)


def read(tmp_path, fmt: str, records, name: str = "input.json", **options) -> list[SourceRecord | Reject]:
    return list(iter_records(fmt, write(tmp_path, records, name), "/data/images", **options))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("world"))
    synth.write_world(root, 20, seed=3)
    return root


@pytest.mark.parametrize(("fmt", "name"), SYNTH_FILES)
def test_every_synth_file_parses_without_rejects(world, fmt, name):
    annotations = os.path.join(world, "annotations")
    detections = os.path.join(annotations, "refcoco_dets.json") if fmt == "refcoco" else None
    items = list(iter_records(fmt, os.path.join(annotations, name), os.path.join(world, "images"),
                              detections=detections))
    with open(os.path.join(annotations, name), encoding="utf-8") as handle:
        assert len(items) == len(json.load(handle))
    assert all(isinstance(item, SourceRecord) for item in items)
    assert all(os.path.isfile(path) for item in items for path in item.image_paths)
    assert all(item.meta["source"] == fmt and item.text for item in items)
    assert [item.origin for item in items[:2]] == [f"{name}#0", f"{name}#1"]
    if fmt == "refcoco":  # each target is among its image's proposals
        assert all(item.meta["box"] in item.meta["proposals"] for item in items)
    if fmt == "nlvr2":
        half = len(items) // 2
        assert Counter(item.meta["label"] for item in items) == {True: half, False: half}
    if fmt in ("coco", "caption") and "train" not in name:
        assert all(len(item.meta["captions"]) == 5 for item in items)


def test_albef_caption_list_gives_first_as_text_and_all_as_captions(tmp_path):
    items = read(tmp_path, "albef", [{"image": "a.jpg", "caption": ["one", " ", "two "]},
                                     {"image": "/data/images/b.jpg", "caption": "three", "image_id": 7}])
    assert items == [
        SourceRecord("input.json#0", ["/data/images/a.jpg"], "one",
                     {"source": "albef", "captions": ["one", "two"]}),
        SourceRecord("input.json#1", ["/data/images/b.jpg"], "three",
                     {"source": "albef", "captions": ["three"], "image_id": 7})]


def test_xvlm_boxes_become_xyxy_and_json_lines_read_alike(tmp_path):
    record = {"image": "a.jpg", "caption": "scene", "elems": [
        {"caption": ["red circle", "circle"], "attributes": "small", "bb": [10, 20, 30, 40]},
        {"caption": "blue square", "bb": [0.5, 1, 2, 3]}]}
    from_list = read(tmp_path, "xvlm", [record])
    assert from_list[0].meta == {"source": "xvlm", "captions": ["scene"], "regions": [
        {"box": [10.0, 20.0, 40.0, 60.0], "text": "red circle", "label": "small"},
        {"box": [0.5, 1.0, 2.5, 4.0], "text": "blue square", "label": None}]}
    from_lines = read(tmp_path, "xvlm", [record], name="input.jsonl")
    assert [item.meta for item in from_lines] == [from_list[0].meta]
    without_caption = read(tmp_path, "xvlm", [{"image_rpath": "v.jpg", "elems": record["elems"]}])[0]
    assert without_caption.text == "red circle" and "captions" not in without_caption.meta


def test_pevl_spans_map_to_their_substrings(tmp_path):
    caption = "a red circle left of a blue square"
    items = read(tmp_path, "pevl", [{"file_name": "p.jpg", "caption": caption,
                                     "tokens_positive": [[[2, 12]], [23, 34]],
                                     "bbox_list": [[1, 2, 3, 4], [5.5, 6, 7, 8]]}])
    assert items[0].text == caption and items[0].image_paths == ["/data/images/p.jpg"]
    assert items[0].meta["regions"] == [
        {"box": [1.0, 2.0, 3.0, 4.0], "text": "red circle", "span": [2, 12]},
        {"box": [5.5, 6.0, 7.0, 8.0], "text": "blue square", "span": [23, 34]}]


def test_refcoco_target_and_proposals_are_converted_from_xywh(tmp_path):
    detections = write(tmp_path, {"r.jpg": [[0, 0, 10, 10], [5, 6, 7, 8]]}, name="dets.json")
    items = read(tmp_path, "refcoco", [
        {"image": "r.jpg", "text": "the red circle", "ref_id": 4, "bbox": [5, 6, 7, 8]},
        {"image": "elsewhere.jpg", "text": "x", "ref_id": 5, "bbox": [0, 0, 1, 1]}], detections=detections)
    assert items[0].meta == {"source": "refcoco", "ref_id": 4, "text": "the red circle",
                             "box": [5.0, 6.0, 12.0, 14.0],
                             "proposals": [[0.0, 0.0, 10.0, 10.0], [5.0, 6.0, 12.0, 14.0]]}
    assert items[1].meta["proposals"] == []


def test_vqa_answers_become_counts_in_first_seen_order(tmp_path):
    answers = ["2", "two", "2", "3", "two", "2"]
    items = read(tmp_path, "vqa", [
        {"question_id": 9, "question": "how many?", "answer": answers, "image": "q.jpg", "dataset": "vqa"},
        {"question_id": "vg1", "question": "what?", "answer": "red", "image": "q.jpg", "dataset": "vg"},
        {"question_id": 10, "question": "is it?", "image": "q.jpg"}], name="vqa_val.json")
    assert items[0].text == "how many?"
    assert items[0].meta == {"source": "vqa", "question_id": 9, "question": "how many?", "dataset": "vqa",
                             "answers": [{"answer": "2", "count": 3}, {"answer": "two", "count": 2},
                                         {"answer": "3", "count": 1}], "split": "val"}
    assert items[1].meta["answers"] == [{"answer": "red", "count": 1}] and items[1].meta["dataset"] == "vg"
    assert items[2].meta["answers"] == [] and items[2].meta["dataset"] == "vqa"


def test_nlvr2_keeps_image_order_and_ve_adds_the_jpg_extension(tmp_path):
    pair = read(tmp_path, "nlvr2", [{"images": ["b.jpg", "a.jpg"], "sentence": "both red", "label": "False"}])
    assert pair[0].image_paths == ["/data/images/b.jpg", "/data/images/a.jpg"]
    assert pair[0].text == "both red"
    assert pair[0].meta == {"source": "nlvr2", "sentence": "both red", "label": False}
    entail = read(tmp_path, "ve", [{"image": "2345", "sentence": "a dog", "label": "neutral"}])[0]
    assert entail.image_paths == ["/data/images/2345.jpg"]
    assert entail.meta == {"source": "ve", "sentence": "a dog", "label": "neutral"}


def test_image_root_joins_urls_and_other_buckets_need_their_scheme_allowed(tmp_path):
    path = write(tmp_path, [{"image": "x/a.jpg", "caption": "c"}, {"image": "s3://b/c.jpg", "caption": "c"},
                            {"image": "s3://bucket/images/y.jpg", "caption": "c"}])
    items = list(iter_records("coco", path, "s3://bucket/images/"))
    assert [getattr(item, "image_paths", None) for item in items] == [
        ["s3://bucket/images/x/a.jpg"], None, ["s3://bucket/images/y.jpg"]]
    assert items[1] == Reject("input.json#1", "image reference not allowed",
                              "'s3://b/c.jpg': s3:// images outside --image-root are read only with "
                              "--allow-image-scheme s3")
    allowed = list(iter_records("coco", path, "s3://bucket/images/", allowed_schemes=("s3",)))
    assert allowed[1].image_paths == ["s3://b/c.jpg"]


MALFORMED = [
    ("albef", [1, 2], "malformed record: not a JSON object"),
    ("albef", {"caption": "c"}, "malformed record: missing field 'image'"),
    ("albef", {"image": "", "caption": "c"}, "malformed record: field 'image' must be a non-empty string"),
    ("albef", {"image": "a.jpg", "caption": 3},
     "malformed record: field 'caption' must be a string or a list of strings"),
    ("albef", {"image": "a.jpg", "caption": ""}, "empty caption"),
    ("albef", {"image": "a.jpg", "caption": "  \n"}, "empty caption"),
    ("albef", {"image": "a.jpg", "caption": ["", " "]}, "empty caption"),
    ("coco", {"image": "a.jpg", "caption": "c", "image_id": True},
     "malformed record: field 'image_id' must be an integer or a string"),
    ("vicha", {"image": "a.jpg", "caption": "c"}, "malformed record: missing field 'kwords'"),
    ("vicha", {"image": "a.jpg", "caption": "c", "kwords": "red"},
     "malformed record: field 'kwords' must be a list of strings"),
    ("xvlm", {"image": "a.jpg", "elems": []},
     "malformed record: field 'elems' must be a non-empty list of objects"),
    ("xvlm", {"image": "a.jpg", "elems": [{"caption": "c", "bb": [1, 2, 3]}]},
     "malformed record: field 'bb' must be a list of 4 numbers"),
    ("xvlm", {"image": "a.jpg", "elems": [{"caption": "c", "bb": [1, 2, 3, "4"]}]},
     "malformed record: field 'bb' must be a list of 4 numbers"),
    ("xvlm", {"image": "a.jpg", "elems": [{"caption": "c"}]}, "malformed record: missing field 'bb'"),
    ("xvlm", {"image": "a.jpg", "elems": [{"caption": " ", "bb": [1, 2, 3, 4]}]}, "empty caption"),
    ("xvlm", {"image": "a.jpg", "elems": [{"caption": "c", "attributes": 5, "bb": [1, 2, 3, 4]}]},
     "malformed record: field 'attributes' must be a string or a list of strings"),
    ("pevl", {"image": "a.jpg", "caption": "red", "tokens_positive": [[0, 3]], "bbox_list": []},
     "malformed record: fields 'tokens_positive' and 'bbox_list' must be lists of the same length"),
    ("pevl", {"image": "a.jpg", "caption": "red", "tokens_positive": [[0, 9]], "bbox_list": [[0, 0, 1, 1]]},
     "malformed record: field 'tokens_positive' must hold [start, end] spans inside the caption"),
    ("pevl", {"image": "a.jpg", "caption": "red", "tokens_positive": [[0, 3]], "bbox_list": [[0, 0, 1]]},
     "malformed record: field 'bbox_list' must be a list of 4 numbers"),
    ("pevl", {"image": "a.jpg", "caption": " ", "tokens_positive": [], "bbox_list": []}, "empty caption"),
    ("vqa", {"question": "q?", "image": "a.jpg"}, "malformed record: missing field 'question_id'"),
    ("vqa", {"question_id": 1, "question": "q?", "image": "a.jpg", "answer": [1]},
     "malformed record: field 'answer' must be a string or a list of strings"),
    ("vqa", {"question_id": 1, "question": "", "image": "a.jpg"}, "empty caption"),
    ("nlvr2", {"images": ["a.jpg"], "sentence": "s", "label": "True"},
     "malformed record: field 'images' must be a list of 2 image paths"),
    ("nlvr2", {"images": ["a.jpg", "b.jpg"], "sentence": "s", "label": "true"},
     "malformed record: field 'label' must be one of 'True', 'False'"),
    ("nlvr2", {"images": ["a.jpg", "b.jpg"], "sentence": "s", "label": True},
     "malformed record: field 'label' must be one of 'True', 'False'"),
    ("ve", {"image": "a", "sentence": "s", "label": "maybe"},
     "malformed record: field 'label' must be one of 'entailment', 'neutral', 'contradiction'"),
    ("ve", {"image": "a", "sentence": "s", "label": ["neutral"]},
     "malformed record: field 'label' must be one of 'entailment', 'neutral', 'contradiction'"),
    ("refcoco", {"image": "a.jpg", "text": "t", "ref_id": 1}, "malformed record: missing field 'bbox'"),
    ("refcoco", {"image": "a.jpg", "text": "t", "ref_id": 1, "bbox": [0, 0, float("nan"), 1]},
     "malformed record: field 'bbox' must be a list of 4 numbers"),
    ("refcoco", {"image": "a.jpg", "text": "", "ref_id": 1, "bbox": [0, 0, 1, 1]}, "empty caption"),
]


@pytest.mark.parametrize(("fmt", "record", "reason"), MALFORMED)
def test_malformed_records_give_their_exact_reason(tmp_path, fmt, record, reason):
    good = {"image": "ok.jpg", "caption": "fine"}
    items = read(tmp_path, fmt, [record])
    assert items == [Reject("input.json#0", reason)]
    if fmt == "albef":  # the next record still comes through
        items = read(tmp_path, fmt, [record, good])
        assert isinstance(items[0], Reject) and items[1].text == "fine"


def test_corrupt_synth_records_give_empty_caption_rejects(tmp_path):
    synth.write_world(str(tmp_path), 10, seed=0, corrupt=2)
    items = list(iter_records("albef", str(tmp_path / "annotations" / "pretrain_albef.json"),
                              str(tmp_path / "images")))
    assert Counter(item.reason for item in items if isinstance(item, Reject)) == {"empty caption": 2}
    assert len(items) == 8 + 6


def test_unknown_format_lists_the_known_ones(tmp_path):
    with pytest.raises(ValueError) as error:
        iter_records("laion", write(tmp_path, []), "/data")
    assert str(error.value) == f"unknown annotation format 'laion'; choose one of {', '.join(FORMATS)}"


def test_file_problems_raise_one_clear_error_naming_the_file(tmp_path):
    missing = str(tmp_path / "nothere.json")
    with pytest.raises(AnnotationFileError, match=f"annotation file {missing} not found; check the path"):
        iter_records("albef", missing, "/data")
    broken = tmp_path / "broken.json"
    broken.write_text("[{", encoding="utf-8")
    with pytest.raises(AnnotationFileError, match=f"annotation file {broken} is not valid JSON"):
        iter_records("albef", str(broken), "/data")
    with pytest.raises(AnnotationFileError, match="must hold a JSON list of records, found a JSON dict"):
        iter_records("albef", write(tmp_path, {"image": "a.jpg"}), "/data")
    with pytest.raises(AnnotationFileError, match="jsonl not found"):
        iter_records("albef", str(tmp_path / "absent.jsonl"), "/data")


def test_detections_problems_are_reported(tmp_path):
    records = write(tmp_path, [{"image": "a.jpg", "text": "t", "ref_id": 1, "bbox": [0, 0, 1, 1]}])
    with pytest.raises(ValueError, match="a detections file only applies to the refcoco format, not 'albef'"):
        iter_records("albef", records, "/data", detections=records)
    bad = write(tmp_path, {"a.jpg": [[0, 0, 1]]}, name="dets.json")
    with pytest.raises(AnnotationFileError, match="entry 'a.jpg' must be a list of \\[x, y, w, h\\] boxes"):
        iter_records("refcoco", records, "/data", detections=bad)
    with pytest.raises(AnnotationFileError, match="must hold a JSON object"):
        iter_records("refcoco", records, "/data", detections=write(tmp_path, [], name="list.json"))
