"""The embedded synthetic world: scenes of coloured shapes and every annotation kind drawn from them.

Run: ``python -m data_shards synth --out DIR --num-images 2000 --seed 0 [--corrupt K]``.

A scene holds 1-4 non-overlapping shapes (circle/square/triangle, six colours, small or large) on a plain or
lightly noisy grey background, 160-256 px per side, saved as baseline JPEG (quality 90). The same seed gives
byte-identical files. Images split 80/10/10 by index (train first) and every task keeps that split. Two shapes
of one colour and kind never share a column, so "on the left"/"on the right" always tells them apart.
Files under DIR (annotation image paths are relative to DIR/images; pretraining files use train images):
  images/img_NNNNNN.jpg             one per scene (NLVR2 pairs reuse them)
  annotations/pretrain_albef.json   [{image, caption: str | [5 str]}], one per image
  annotations/pretrain_xvlm_regions.json  [{image, caption, elems: [{caption: str | [str], attributes: size,
                                    bb: [x, y, w, h] px}]}], one per image
  annotations/pretrain_pevl_grounding.json  [{image, caption, tokens_positive: [[[start, end]], ...] one per
                                    box, bbox_list: [[x1, y1, x2, y2] px]}], one per image
  annotations/pretrain_vicha_kwords.json  [{image, caption, kwords: [15 str]}], one per image
  annotations/{retrieval,caption}_train.json  [{image, caption, image_id}], 5 per image (ALBEF, Karpathy)
  annotations/{retrieval,caption}_{val,test}.json  [{image, caption: [5 str]}] (caption_* add image_id)
  annotations/vqa_{train,val,test}.json  [{question_id, question, answer: [10 annotator answers], image,
                                    dataset: "vqa"}], 3 per image; vqa_answer_list.json: [str]
  annotations/nlvr2_{train,val,test}.json  [{images: [a, b], sentence, label: "True" | "False"}], balanced
  annotations/ve_{train,val,test}.json  [{image, sentence, label}], one per label per image
  annotations/refcoco_{train,val,test}.json  [{image, text, ref_id, bbox: [x, y, w, h] px}], one per shape
  annotations/refcoco_dets.json     {image: [[x, y, w, h], ...]}: every shape's box plus 2-3 distractors
  annotations/phrase_grounding_*, vrd_*, gqa_*, vcr_* (PEVL's tasks: data_shards/synth_pevl.py)
``--corrupt K`` appends broken cases for the builder: pretrain_albef.json gets K records naming a missing
image, K naming images/truncated_NNNNNN.jpg (half of a real JPEG) and K with an empty or blank caption;
pretrain_xvlm_regions.json gets K records whose last elem box lies partly outside the image and K whose
last elem box has zero width.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import pathlib
import random
import sys
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from data_shards.synth_pevl import pevl_annotations

COLOURS = MappingProxyType({"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220),
                            "yellow": (235, 210, 20), "purple": (140, 40, 190), "orange": (245, 130, 10)})
KINDS = ("circle", "square", "triangle")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Annotator noise: what a second person might have typed for the same answer.
SYNONYMS = MappingProxyType({
    "yes": "yeah", "no": "nope", "red": "dark red", "green": "light green", "blue": "dark blue",
    "yellow": "gold", "purple": "violet", "orange": "dark orange", "circle": "round", "square": "rectangle",
    "triangle": "triangular", "small": "tiny", "large": "big", "1": "one", "2": "two", "3": "three"})
NEUTRAL_TEMPLATES = ("the shapes were drawn by a child", "the {c} {k} was painted yesterday",
                     "the picture is part of a school project", "someone cut the {c} {k} out of paper",
                     "the artist's favourite colour is {c}", "this drawing was made on a tablet")
CONCEPT_FILLERS = ("shape", "shapes", "geometric shapes", "drawing", "picture", "background", "object",
                   "objects", "figure", "pattern", "colors", "plain background", "simple image", "icon")


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    size: str
    box: tuple[int, int, int, int]  # x1, y1, x2, y2 pixels with x2, y2 exclusive: side = x2 - x1

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"

    @property
    def xywh(self) -> list[int]:
        return [self.box[0], self.box[1], self.box[2] - self.box[0], self.box[3] - self.box[1]]


@dataclass(frozen=True)
class Scene:
    file_name: str
    image_id: int
    width: int
    height: int
    shapes: tuple[Shape, ...]


def _fits(new: Shape, placed: list[Shape]) -> bool:
    """Boxes keep 6 px apart; at most two of one colour and kind, and those share no column."""
    a, twins = new.box, [s.box for s in placed if s.name == new.name]
    if len(twins) > 1 or any(not (t[2] + 6 <= a[0] or a[2] + 6 <= t[0]) for t in twins):
        return False
    return all(b[2] + 6 <= a[0] or a[2] + 6 <= b[0] or b[3] + 6 <= a[1] or a[3] + 6 <= b[1]
               for b in (s.box for s in placed))


def make_scene(rng: random.Random, image_id: int) -> Scene:
    width, height = rng.randint(160, 256), rng.randint(160, 256)
    shapes: list[Shape] = []
    for _ in range(rng.randint(1, 4)):
        for _attempt in range(40):  # a crowded image may not take another shape; then it keeps fewer
            size = rng.choice(("small", "large"))
            side = rng.randint(22, 32) if size == "small" else rng.randint(46, 60)
            x, y = rng.randint(4, width - side - 4), rng.randint(4, height - side - 4)
            candidate = Shape(rng.choice(KINDS), rng.choice(tuple(COLOURS)), size, (x, y, x + side, y + side))
            if _fits(candidate, shapes):
                shapes.append(candidate)
                break
    return Scene(f"img_{image_id:06d}.jpg", image_id, width, height, tuple(shapes))


def render_scene(scene: Scene, rng: random.Random) -> bytes:
    base = rng.randint(195, 235)
    tint = np.array([base + rng.randint(-8, 8) for _ in range(3)], dtype=np.int16)
    pixels = np.broadcast_to(tint, (scene.height, scene.width, 3))
    if rng.random() < 0.5:
        pixels = pixels + np.random.default_rng(rng.getrandbits(64)).integers(-10, 11, pixels.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        (x1, y1, x2, y2), fill = shape.box, COLOURS[shape.colour]
        if shape.kind == "triangle":
            draw.polygon(((x1, y2 - 1), (x2 - 1, y2 - 1), ((x1 + x2 - 1) / 2, y1)), fill=fill)
        else:
            (draw.ellipse if shape.kind == "circle" else draw.rectangle)((x1, y1, x2 - 1, y2 - 1), fill=fill)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, progressive=False, optimize=False)
    return buffer.getvalue()


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def relation(a: Shape, b: Shape) -> str:
    """Where a lies relative to b; placement keeps boxes apart, so one axis always separates them."""
    if a.box[2] <= b.box[0]:
        return "left of"
    if a.box[0] >= b.box[2]:
        return "right of"
    return "above" if a.box[3] <= b.box[1] else "below"


def spanned_caption(shapes: list[Shape]) -> tuple[str, list[list[int]]]:
    """'a red circle left of a blue square and a green triangle', with the char span of each shape name."""
    separators = [""] + ([f" {relation(shapes[0], shapes[1])} "] if len(shapes) > 1 else [])
    separators += [", "] * (len(shapes) - 3) + [" and "] * (len(shapes) > 2)
    text, spans = "", []
    for separator, shape in zip(separators, shapes, strict=True):
        text += separator + _a(shape.name)[: -len(shape.name)]
        spans.append([len(text), len(text) + len(shape.name)])
        text += shape.name
    return text, spans


def captions(scene: Scene, rng: random.Random) -> list[str]:
    """Five captions: a listing, a relation, the reversed relation, a count, the sizes."""
    ordered = sorted(scene.shapes, key=lambda s: (s.box[0], s.box[1]))  # left to right
    listing = _join([_a(s.name) for s in ordered])
    if len(ordered) == 1:
        only, places = ordered[0], ("on the left", "in the middle", "on the right")
        where = places[min(2, 3 * sum(only.box[::2]) // (2 * scene.width))]  # third holding the box centre
        return [listing, f"a single {only.size} {only.name}", f"one {only.name} {where}",
                f"a {only.size} {only.kind} in {only.colour}", f"{_a(only.name)} on a plain background"]
    pair, sized = rng.sample(ordered, 2), _join([f"a {s.size} {s.name}" for s in ordered])
    rest = [s for s in ordered if s not in pair]
    return [listing, spanned_caption(pair + rest)[0], spanned_caption(pair[::-1] + rest)[0],
            f"{NUMBER_WORDS[len(ordered)]} shapes: {listing}", sized]


def referring_expression(scene: Scene, target: Shape, rng: random.Random) -> str:
    twins = [s for s in scene.shapes if s.name == target.name and s is not target]
    if not twins:
        return rng.choice((f"the {target.name}", f"the {target.size} {target.name}"))
    side = "on the left" if target.box[2] <= twins[0].box[0] else "on the right"
    options = [f"the {target.name} {side}", f"the {target.size} {target.name} {side}"]
    if target.size != twins[0].size:
        options.append(f"the {target.size} {target.name}")
    return rng.choice(options)


def _absent_names(scene: Scene) -> list[str]:
    return [f"{c} {k}" for c in COLOURS for k in KINDS if all(s.name != f"{c} {k}" for s in scene.shapes)]


def vqa_pairs(scene: Scene, rng: random.Random) -> list[tuple[str, str]]:
    """Three (question, answer) pairs of different kinds, each answerable from the scene alone."""
    shapes = scene.shapes
    kind = rng.choice(KINDS)
    asked = rng.choice(shapes).name if rng.random() < 0.5 else rng.choice(_absent_names(scene))
    pairs = {"count": ("how many shapes are there?", str(len(shapes))),
             "count_kind": (f"how many {kind}s are there?", str(sum(s.kind == kind for s in shapes))),
             "exists": (f"is there {_a(asked)}?", "yes" if any(s.name == asked for s in shapes) else "no")}
    # "the circle" must name one shape: ask about a kind, colour or name the scene holds once.
    single = {key: [s for s in shapes if sum(getattr(o, key) == getattr(s, key) for o in shapes) == 1]
              for key in ("kind", "colour", "name")}
    for key, question, answer in (("kind", "what color is the {s.kind}?", "colour"),
                                  ("colour", "what shape is the {s.colour} object?", "kind"),
                                  ("name", "what size is the {s.name}?", "size")):
        if single[key]:
            shape = rng.choice(single[key])
            pairs[answer] = (question.format(s=shape), getattr(shape, answer))
    if len(single["name"]) >= 2:
        a, b = rng.sample(single["name"], 2)
        answer = "yes" if relation(a, b) == "left of" else "no"
        pairs["left"] = (f"is the {a.name} left of the {b.name}?", answer)
    return [pairs[name] for name in rng.sample(sorted(pairs), 3)]


def annotator_answers(answer: str, rng: random.Random) -> list[str]:
    answers = [answer] * 10
    for _ in range(rng.choice((0, 0, 1, 2))):
        noise = SYNONYMS.get(answer, answer) if rng.random() < 0.7 else rng.choice(tuple(SYNONYMS))
        answers[rng.randrange(10)] = noise
    return answers


def nlvr2_statement(left: Scene, right: Scene, wanted: bool, rng: random.Random) -> str:
    """A statement about the pair whose truth is ``wanted``: random templates, a count as the last resort."""
    has = lambda scene, name: any(s.name == name for s in scene.shapes)
    count = lambda scene, kind: sum(s.kind == kind for s in scene.shapes)
    for _ in range(50):
        colour = rng.choice(tuple(COLOURS) + tuple(s.colour for s in left.shapes + right.shapes))
        kind = rng.choice(KINDS)
        name = f"{colour} {kind}"
        sentence, truth = rng.choice([
            (f"both images contain {_a(colour)} shape",
             all(any(s.colour == colour for s in scene.shapes) for scene in (left, right))),
            (f"the left image has more {kind}s than the right image", count(left, kind) > count(right, kind)),
            ("the right image has more shapes than the left image", len(right.shapes) > len(left.shapes)),
            (f"exactly one image contains {_a(name)}", has(left, name) != has(right, name)),
            (f"neither image contains a {kind}", count(left, kind) + count(right, kind) == 0),
            (f"the left image contains {_a(name)}", has(left, name))])
        if truth == wanted:
            return sentence
    total = len(left.shapes) + len(right.shapes)
    return f"there are {NUMBER_WORDS[total if wanted else total + 1]} shapes in total"


def ve_hypotheses(scene: Scene, rng: random.Random) -> list[tuple[str, str]]:
    """One hypothesis per label, shuffled: true, undeterminable from the picture, false."""
    shape, n = rng.choice(scene.shapes), len(scene.shapes)
    true = [f"there is {_a(shape.name)}", f"the image shows {NUMBER_WORDS[n]} shapes"]
    false = [f"there is {_a(rng.choice(_absent_names(scene)))}",
             f"the image shows {NUMBER_WORDS[n + rng.choice((1, 2))]} shapes"]
    if sum(s.kind == shape.kind for s in scene.shapes) == 1:  # "the circle" must name one shape
        true.append(f"the {shape.kind} is {shape.size}")
        false.append(f"the {shape.kind} is {'small' if shape.size == 'large' else 'large'}")
    if n > 1:
        a, b = rng.sample(scene.shapes, 2)
        true.append(f"{_a(a.name)} is {relation(a, b)} {_a(b.name)}")
        false.append(f"{_a(a.name)} is {relation(b, a)} {_a(b.name)}")  # b's side of a is the opposite side
    neutral = rng.choice(NEUTRAL_TEMPLATES).format(c=shape.colour, k=shape.kind)
    labelled = [(rng.choice(true), "entailment"), (neutral, "neutral"), (rng.choice(false), "contradiction")]
    rng.shuffle(labelled)
    return labelled


def concepts(scene: Scene) -> list[str]:
    """ViCHA-style top-15 visual concepts: the scene's nouns first, then near-duplicates as padding."""
    words = [w for s in scene.shapes for w in (s.name, s.kind, s.colour, f"{s.kind}s", f"{s.colour} shape")]
    return list(dict.fromkeys(words + list(CONCEPT_FILLERS)))[:15]


def split_of(scenes: list[Scene]) -> dict[str, list[Scene]]:
    held_out = max(1, round(len(scenes) * 0.1))
    train_end = len(scenes) - 2 * held_out
    return {"train": scenes[:train_end], "val": scenes[train_end:train_end + held_out],
            "test": scenes[train_end + held_out:]}


def pretrain_annotations(train: list[Scene], caption_sets: dict[str, list[str]]) -> dict[str, list]:
    albef, xvlm, pevl, vicha = [], [], [], []
    for s in train:
        texts = caption_sets[s.file_name]
        albef.append({"image": s.file_name, "caption": texts if s.image_id % 2 == 0 else texts[0]})
        elems = [{"caption": [shape.name, f"{shape.size} {shape.name}"] if position % 2 == 0 else shape.name,
                  "attributes": shape.size, "bb": shape.xywh} for position, shape in enumerate(s.shapes)]
        xvlm.append({"image": s.file_name, "caption": texts[0], "elems": elems})
        text, spans = spanned_caption(list(s.shapes))
        pevl.append({"image": s.file_name, "caption": text, "tokens_positive": [[span] for span in spans],
                     "bbox_list": [list(shape.box) for shape in s.shapes]})
        vicha.append({"image": s.file_name, "caption": texts[s.image_id % 5], "kwords": concepts(s)})
    return {"pretrain_albef.json": albef, "pretrain_xvlm_regions.json": xvlm,
            "pretrain_pevl_grounding.json": pevl, "pretrain_vicha_kwords.json": vicha}


def build_annotations(scenes: list[Scene], seed: int) -> dict[str, object]:
    """Every annotation file's content, keyed by file name; a fixed-seed generator per task and split."""
    splits = split_of(scenes)
    caption_sets = {s.file_name: captions(s, random.Random(f"{seed}:captions:{s.image_id}")) for s in scenes}
    files: dict[str, object] = pretrain_annotations(splits["train"], caption_sets)
    files["retrieval_train.json"] = files["caption_train.json"] = [
        {"image": s.file_name, "caption": text, "image_id": s.image_id}
        for s in splits["train"] for text in caption_sets[s.file_name]]
    answers_seen = set(COLOURS) | set(KINDS) | {"yes", "no", "small", "large", "0", "1", "2", "3", "4"}
    question_id = ref_id = 0
    for split, members in splits.items():
        rng = random.Random(f"{seed}:tasks:{split}")
        if split != "train":
            files[f"retrieval_{split}.json"] = [{"image": s.file_name, "caption": caption_sets[s.file_name]}
                                                for s in members]
            files[f"caption_{split}.json"] = [{"image": s.file_name, "caption": caption_sets[s.file_name],
                                               "image_id": s.image_id} for s in members]
        vqa, refcoco, ve, nlvr2 = [], [], [], []
        for s in members:
            for question, answer in vqa_pairs(s, rng):
                answers = annotator_answers(answer, rng)
                answers_seen.update(answers)
                vqa.append({"question_id": question_id, "question": question, "answer": answers,
                            "image": s.file_name, "dataset": "vqa"})
                question_id += 1
            for shape in s.shapes:
                refcoco.append({"image": s.file_name, "text": referring_expression(s, shape, rng),
                                "ref_id": ref_id, "bbox": shape.xywh})
                ref_id += 1
            ve += [{"image": s.file_name, "sentence": sentence, "label": label}
                   for sentence, label in ve_hypotheses(s, rng)]
        labels = [position % 2 == 0 for position in range(len(members))]
        rng.shuffle(labels)
        for s, label in zip(members, labels, strict=True):
            partner = rng.choice([o for o in members if o is not s] or [s])
            nlvr2.append({"images": [s.file_name, partner.file_name], "label": str(label),
                          "sentence": nlvr2_statement(s, partner, label, rng)})
        files.update({f"vqa_{split}.json": vqa, f"refcoco_{split}.json": refcoco, f"ve_{split}.json": ve,
                      f"nlvr2_{split}.json": nlvr2})
    files["vqa_answer_list.json"] = sorted(answers_seen)
    files["refcoco_dets.json"] = dets = {}
    for s in scenes:  # proposals: every shape's box and 2-3 random distractors, shuffled
        rng = random.Random(f"{seed}:dets:{s.image_id}")
        sides = [(rng.randint(16, 60), rng.randint(16, 60)) for _ in range(rng.randint(2, 3))]
        boxes = [shape.xywh for shape in s.shapes]
        boxes += [[rng.randint(0, s.width - w), rng.randint(0, s.height - h), w, h] for w, h in sides]
        rng.shuffle(boxes)
        dets[s.file_name] = boxes
    files.update(pevl_annotations(splits, seed, relation=relation, spanned_caption=spanned_caption,
                                  colours=tuple(COLOURS)))
    return files


def add_corrupt_cases(files: dict[str, object], scenes: list[Scene], jpegs: dict[str, bytes],
                      count: int) -> dict[str, bytes]:
    """Append the documented broken records; return the truncated JPEG files to write (name -> bytes)."""
    train = split_of(scenes)["train"]
    truncated = {}
    for k in range(count):
        scene = train[k % len(train)]
        name = f"truncated_{k:06d}.jpg"
        truncated[name] = jpegs[scene.file_name][: len(jpegs[scene.file_name]) // 2]
        files["pretrain_albef.json"] += [
            {"image": f"missing_{k:06d}.jpg", "caption": "a red circle"},
            {"image": name, "caption": "a blue square"},
            {"image": scene.file_name, "caption": "" if k % 2 == 0 else "   "}]
        elems = [{"caption": s.name, "bb": s.xywh} for s in scene.shapes]
        for broken in ([scene.width - 10, 10, 40, 40], [10, 10, 0, 30]):  # partly outside, zero width
            elem = {"caption": "edge", "bb": broken}
            files["pretrain_xvlm_regions.json"].append({"image": scene.file_name, "caption": "shapes",
                                                        "elems": elems + [elem]})
    return truncated


def write_world(out: str, num_images: int, seed: int, corrupt: int = 0) -> dict[str, object]:
    """Draw ``num_images`` scenes under ``out`` and write every annotation file; returns their contents."""
    image_dir, annotation_dir = os.path.join(out, "images"), os.path.join(out, "annotations")
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(annotation_dir, exist_ok=True)
    # Images an earlier, larger run left here would otherwise survive; annotation names never change.
    for stale in glob.glob(os.path.join(glob.escape(image_dir), "*_[0-9][0-9][0-9][0-9][0-9][0-9].jpg")):
        os.remove(stale)
    scenes, jpegs = [], {}
    for image_id in tqdm(range(num_images), desc="synth images", file=sys.stderr, unit="img"):
        rng = random.Random(f"{seed}:scene:{image_id}")
        scene = make_scene(rng, image_id)
        jpegs[scene.file_name] = render_scene(scene, rng)
        scenes.append(scene)
    files = build_annotations(scenes, seed)
    jpegs.update(add_corrupt_cases(files, scenes, jpegs, corrupt))
    for name, data in jpegs.items():
        pathlib.Path(image_dir, name).write_bytes(data)
    for name, content in files.items():
        pathlib.Path(annotation_dir, name).write_text(json.dumps(content, sort_keys=True), encoding="utf-8")
    return files


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_shards synth", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder (images/ and annotations/ go inside)")
    parser.add_argument("--num-images", type=int, default=2000, help="number of scenes (at least 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--corrupt", type=int, default=0, help="also write K broken cases of each kind")
    args = parser.parse_args(argv)
    if args.num_images < 3 or args.corrupt < 0:
        parser.error("--num-images must be at least 3 (an image per split) and --corrupt at least 0, "
                     f"got {args.num_images} and {args.corrupt}")
    files = write_world(args.out, args.num_images, args.seed, args.corrupt)
    print(f"synth: {args.num_images} images, {len(files)} annotation files in {args.out}", file=sys.stderr)
    return 0
