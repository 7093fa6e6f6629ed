"""Tests for data_shards/synth.py: determinism, documented counts, broken cases and the scenes' structure.

Run: ``.venv/bin/python -m pytest -q tests/data_shards/test_synth.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections import Counter

import pytest
from PIL import Image

from data_shards import synth

NUM_IMAGES = 20  # splits 16 / 2 / 2


def tree_digest(root: str) -> dict[str, str]:
    digests = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as handle:
                digests[os.path.relpath(path, root)] = hashlib.sha256(handle.read()).hexdigest()
    return digests


def load(root, name: str):
    with open(os.path.join(root, "annotations", name), encoding="utf-8") as handle:
        return json.load(handle)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("world"))
    assert synth.main(["--out", root, "--num-images", str(NUM_IMAGES), "--seed", "7"]) == 0
    return root


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path, world):
    synth.main(["--out", str(tmp_path / "again"), "--num-images", str(NUM_IMAGES), "--seed", "7"])
    synth.main(["--out", str(tmp_path / "other"), "--num-images", str(NUM_IMAGES), "--seed", "8"])
    first, again = tree_digest(world), tree_digest(str(tmp_path / "again"))
    other = tree_digest(str(tmp_path / "other"))
    assert len(first) == NUM_IMAGES + 24 + 14  # 14: PEVL's task files (data_shards/synth_pevl.py)
    assert first == again
    assert set(first) == set(other)
    assert all(first[name] != other[name] for name in first if name.endswith(".jpg"))
    assert first["annotations/vqa_train.json"] != other["annotations/vqa_train.json"]


def test_rerun_with_fewer_images_leaves_no_stale_files(tmp_path):
    synth.write_world(str(tmp_path), 12, seed=1, corrupt=1)
    synth.write_world(str(tmp_path), 5, seed=1)
    assert sorted(os.listdir(tmp_path / "images")) == [f"img_{i:06d}.jpg" for i in range(5)]


def test_images_are_baseline_jpegs_of_varied_sizes(world):
    sizes = set()
    for index in range(NUM_IMAGES):
        with Image.open(os.path.join(world, "images", f"img_{index:06d}.jpg")) as image:
            assert image.format == "JPEG" and not image.info.get("progressive")
            assert 160 <= image.width <= 256 and 160 <= image.height <= 256
            sizes.add(image.size)
    assert len(sizes) > NUM_IMAGES // 2


def test_counts_per_split_are_as_documented(world):
    splits = {"train": range(0, 16), "val": range(16, 18), "test": range(18, 20)}
    shapes_per_image = Counter(r["image"] for split in splits for r in load(world, f"refcoco_{split}.json"))
    for name in ("pretrain_albef.json", "pretrain_xvlm_regions.json", "pretrain_pevl_grounding.json",
                 "pretrain_vicha_kwords.json"):
        assert [r["image"] for r in load(world, name)] == [f"img_{i:06d}.jpg" for i in splits["train"]]
    assert len(load(world, "retrieval_train.json")) == len(load(world, "caption_train.json")) == 16 * 5
    for split, indices in splits.items():
        images = {f"img_{i:06d}.jpg" for i in indices}
        if split != "train":
            for name in (f"retrieval_{split}.json", f"caption_{split}.json"):
                records = load(world, name)
                assert [r["image"] for r in records] == sorted(images)
                assert all(len(r["caption"]) == 5 and len(set(r["caption"])) == 5 for r in records)
        vqa = load(world, f"vqa_{split}.json")
        assert Counter(r["image"] for r in vqa) == {image: 3 for image in images}
        assert all(len(r["answer"]) == 10 and r["dataset"] == "vqa" for r in vqa)
        nlvr2 = load(world, f"nlvr2_{split}.json")
        assert len(nlvr2) == len(indices) and {i for r in nlvr2 for i in r["images"]} <= images
        assert Counter(r["label"] for r in nlvr2) == {"True": len(indices) // 2, "False": len(indices) // 2}
        ve = load(world, f"ve_{split}.json")
        assert Counter((r["image"], r["label"]) for r in ve) == {
            (image, label): 1 for image in images for label in ("entailment", "neutral", "contradiction")}
        refcoco = load(world, f"refcoco_{split}.json")
        assert {r["image"] for r in refcoco} == images
    all_ids = [r["question_id"] for s in splits for r in load(world, f"vqa_{s}.json")]
    assert len(set(all_ids)) == len(all_ids) == 3 * NUM_IMAGES
    answer_list = set(load(world, "vqa_answer_list.json"))
    assert all(a in answer_list for s in splits for r in load(world, f"vqa_{s}.json") for a in r["answer"])
    dets = load(world, "refcoco_dets.json")
    assert set(dets) == set(shapes_per_image)
    assert all(len(dets[image]) - shapes_per_image[image] in (2, 3) for image in dets)


def nearest_colour(pixel: tuple[int, int, int]) -> str:
    return min(synth.COLOURS, key=lambda name: sum((a - b) ** 2 for a, b in zip(pixel, synth.COLOURS[name],
                                                                                  strict=True)))


def test_annotated_boxes_enclose_the_drawn_shapes(world):
    checked = 0
    for split in ("train", "val", "test"):
        for record in load(world, f"refcoco_{split}.json"):
            colour, kind = re.search(r"(\w+) (circle|square|triangle)", record["text"]).groups()
            x, y, w, h = record["bbox"]
            with Image.open(os.path.join(world, "images", record["image"])) as image:
                rgb = image.convert("RGB")
                assert nearest_colour(rgb.getpixel((x + w // 2, y + h // 2))) == colour
                assert x >= 0 and x + w <= image.width and y >= 0 and y + h <= image.height
                # The box is tight: a square fills its corners; just outside the box is background.
                if kind == "square":
                    assert nearest_colour(rgb.getpixel((x + 2, y + 2))) == colour
                assert max(rgb.getpixel((x + w // 2, y - 3))) > 180  # grey background is bright
                assert max(rgb.getpixel((x - 3, y + h // 2))) > 180
            checked += 1
    assert checked >= NUM_IMAGES


def test_relations_in_captions_match_the_boxes(world):
    seen = Counter()
    for record in load(world, "pretrain_pevl_grounding.json"):
        caption, boxes = record["caption"], record["bbox_list"]
        spans = [spans[0] for spans in record["tokens_positive"]]
        assert len(spans) == len(boxes)
        if len(boxes) < 2:
            continue
        word = caption[spans[0][1]:spans[1][0]].strip()
        first, second = boxes[0], boxes[1]
        holds = {"left of a": first[2] <= second[0], "left of an": first[2] <= second[0],
                 "right of a": first[0] >= second[2], "right of an": first[0] >= second[2],
                 "above a": first[3] <= second[1], "above an": first[3] <= second[1],
                 "below a": first[1] >= second[3], "below an": first[1] >= second[3]}
        assert holds[word], (caption, boxes)
        seen[word.split(" a")[0]] += 1
    assert seen["left of"] and seen["right of"]


def test_vqa_counting_answers_match_the_shapes(world):
    shapes = Counter(r["image"] for s in ("train", "val", "test") for r in load(world, f"refcoco_{s}.json"))
    asked = 0
    for split in ("train", "val", "test"):
        for record in load(world, f"vqa_{split}.json"):
            majority = Counter(record["answer"]).most_common(1)[0][0]
            if record["question"] == "how many shapes are there?":
                assert majority == str(shapes[record["image"]])
                asked += 1
    assert asked > 0


def evaluate_pair_statement(sentence: str, left: synth.Scene, right: synth.Scene) -> bool:
    """An independent reading of every NLVR2 template."""
    def names(scene):
        return [s.name for s in scene.shapes]

    def count(scene, kind):
        return sum(s.kind == kind for s in scene.shapes)

    if match := re.fullmatch(r"both images contain an? (\w+) shape", sentence):
        return all(any(n.startswith(match[1] + " ") for n in names(scene)) for scene in (left, right))
    if match := re.fullmatch(r"the left image has more (\w+)s than the right image", sentence):
        return count(left, match[1]) > count(right, match[1])
    if sentence == "the right image has more shapes than the left image":
        return len(right.shapes) > len(left.shapes)
    if match := re.fullmatch(r"exactly one image contains an? (\w+ \w+)", sentence):
        return (match[1] in names(left)) + (match[1] in names(right)) == 1
    if match := re.fullmatch(r"neither image contains a (\w+)", sentence):
        return count(left, match[1]) == count(right, match[1]) == 0
    if match := re.fullmatch(r"the left image contains an? (\w+ \w+)", sentence):
        return match[1] in names(left)
    match = re.fullmatch(r"there are (\w+) shapes in total", sentence)
    return synth.NUMBER_WORDS.index(match[1]) == len(left.shapes) + len(right.shapes)


def test_nlvr2_statements_have_the_requested_truth():
    scenes = [synth.make_scene(random.Random(f"scene{i}"), i) for i in range(12)]
    rng = random.Random(0)
    for trial in range(300):
        left, right = rng.sample(scenes, 2)
        wanted = trial % 2 == 0
        sentence = synth.nlvr2_statement(left, right, wanted, rng)
        assert evaluate_pair_statement(sentence, left, right) is wanted, sentence


def test_ve_hypotheses_about_presence_and_count_are_labelled_right():
    for index in range(40):
        scene = synth.make_scene(random.Random(f"ve{index}"), index)
        for sentence, label in synth.ve_hypotheses(scene, random.Random(index)):
            if match := re.fullmatch(r"there is an? (\w+ \w+)", sentence):
                present = match[1] in [s.name for s in scene.shapes]
                assert label == ("entailment" if present else "contradiction")
            elif match := re.fullmatch(r"the image shows (\w+) shapes", sentence):
                truth = synth.NUMBER_WORDS.index(match[1]) == len(scene.shapes)
                assert label == ("entailment" if truth else "contradiction")


def shapes_named_by(expression: str, scene: synth.Scene) -> list[synth.Shape]:
    """An independent reading of a referring expression: the shapes of the scene it fits."""
    size, colour, kind, side = re.fullmatch(r"the (?:(small|large) )?(\w+) (\w+)(?: on the (left|right))?",
                                            expression).groups()
    fitting = [s for s in scene.shapes if (s.colour, s.kind) == (colour, kind) and size in (None, s.size)]
    same_name = [s for s in scene.shapes if (s.colour, s.kind) == (colour, kind)]
    if side == "left":
        fitting = [s for s in fitting if all(s.box[2] <= o.box[0] for o in same_name if o is not s)]
    if side == "right":
        fitting = [s for s in fitting if all(s.box[0] >= o.box[2] for o in same_name if o is not s)]
    return fitting


def test_referring_expressions_name_exactly_their_target():
    twins = synth.Scene("twins.jpg", 0, 200, 200, (
        synth.Shape("circle", "red", "small", (10, 10, 40, 40)),
        synth.Shape("circle", "red", "small", (100, 10, 130, 40)),
        synth.Shape("square", "blue", "large", (10, 100, 60, 150))))
    scenes = [twins] + [synth.make_scene(random.Random(f"ref{i}"), i) for i in range(60)]
    rng, expressions = random.Random(0), set()
    for scene in scenes:
        for _ in range(5):
            for target in scene.shapes:
                expression = synth.referring_expression(scene, target, rng)
                assert shapes_named_by(expression, scene) == [target], (expression, scene)
                expressions.add(expression)
    assert {"the red circle on the left", "the red circle on the right"} <= expressions


def test_corrupt_cases_are_appended_as_documented(tmp_path, world):
    root = str(tmp_path)
    synth.main(["--out", root, "--num-images", str(NUM_IMAGES), "--seed", "7", "--corrupt", "2"])
    albef, clean_albef = load(root, "pretrain_albef.json"), load(world, "pretrain_albef.json")
    xvlm, clean_xvlm = load(root, "pretrain_xvlm_regions.json"), load(world, "pretrain_xvlm_regions.json")
    assert albef[:16] == clean_albef and xvlm[:16] == clean_xvlm
    broken = albef[16:]
    assert len(broken) == 6 and len(xvlm) == 16 + 4
    missing = [r["image"] for r in broken if r["image"].startswith("missing_")]
    truncated = [r["image"] for r in broken if r["image"].startswith("truncated_")]
    empty = [r for r in broken if not r["caption"].strip()]
    assert len(missing) == len(truncated) == len(empty) == 2
    assert not any(os.path.exists(os.path.join(root, "images", name)) for name in missing)
    for name in truncated:
        with pytest.raises(OSError), Image.open(os.path.join(root, "images", name)) as image:
            image.load()
    outside = zero_area = 0
    for record in xvlm[16:]:
        with Image.open(os.path.join(root, "images", record["image"])) as image:
            x, y, w, h = record["elems"][-1]["bb"]
            outside += x < image.width < x + w or y < image.height < y + h
            zero_area += w * h == 0
    assert (outside, zero_area) == (2, 2)
    other_files = {n: d for n, d in tree_digest(root).items()
                   if "pretrain_" not in n and "truncated_" not in n}
    assert other_files == {n: d for n, d in tree_digest(world).items() if "pretrain_" not in n}


@pytest.mark.parametrize("arguments", [["--num-images", "2"], ["--num-images", "5", "--corrupt", "-1"]])
def test_bad_arguments_are_refused_with_a_message(tmp_path, capsys, arguments):
    with pytest.raises(SystemExit) as stopped:
        synth.main(["--out", str(tmp_path)] + arguments)
    assert stopped.value.code == 2
    message = "--num-images must be at least 3 (an image per split) and --corrupt at least 0"
    assert message in capsys.readouterr().err
