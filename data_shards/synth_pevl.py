"""The synthetic world's annotations for PEVL's tasks, drawn from the same scenes as every other file.

``data_shards.synth`` calls ``pevl_annotations(splits, seed)`` after writing the other files; each kind draws from
its own generator (``Random(f"{seed}:<kind>:<split or image>")``), so these files never change the others' bytes
and the same seed gives the same files. Image paths are relative to ``DIR/images``, boxes xyxy pixels.

- ``phrase_grounding_{train,val,test}.json``: Flickr30k Entities as MDETR/PEVL write it,
  ``[{image, caption, tokens_positive: [[[start, end]]], bbox_list}]``: every shape named in a caption that
  relates the first two ("a red circle left of a blue square and a green triangle"), in a random order.
- ``vrd_{train,val,test}.json`` + ``vrd_dict.json``: VG-SGG-style predicate classification,
  ``[{image, width, height, boxes: [[x1, y1, x2, y2]] at BOX_SCALE 1024 of the longer side, labels: [class],
  relations: [[subject, object, predicate]]}]`` (indices from 0 into boxes; classes and predicates from 1, names
  in ``vrd_dict.json``'s ``idx_to_label`` / ``idx_to_predicate``). Objects are shape kinds; every ordered pair of
  shapes whose centres lie closer than half the longer image side is related by where the subject lies
  (``left of``, ``right of``, ``on top of``, ``below``); farther pairs are unrelated.
- ``gqa_{train,val,test}.json`` + ``gqa_answer_list.json``: PEVL's GQA records, ``[{image, question, answer,
  tokens_positive: [[start, end]], bbox_list, no_bbox, q_id}]``: questions about a shape named by its kind with
  its box (its colour, its size, whether it lies left of another), and ungrounded counting (``no_bbox: 1``).
- ``vcr_{train,val,test}.json``: VCR's multiple choice with object references, ``[{image, width, height,
  names, bbox_list: [[x1, y1, x2, y2, 1.0]], question, answer_choices (4), answer_label, rationale_choices (4),
  rationale_label, annot_id}]``, texts as token lists where ``[i]`` refers to object i (named by its kind):
  "where is [i] ?" -> "[i] is left of [j]" among the four relations; rationale: "[i] is <colour>" among four
  colours. Images with a single shape have no VRD or VCR records.
"""

from __future__ import annotations

import random

BOX_SCALE = 1024  # VG-SGG stores boxes with the longer image side scaled to 1024
PREDICATES = ("left of", "right of", "on top of", "below")
KIND_CLASSES = ("circle", "square", "triangle")
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
RELATION_PREDICATE = {"left of": "left of", "right of": "right of", "above": "on top of", "below": "below"}


def _centre(shape) -> tuple[float, float]:
    x1, y1, x2, y2 = shape.box
    return (x1 + x2) / 2, (y1 + y2) / 2


def related(a, b, scene) -> bool:
    """Pairs closer than half the longer side carry a relation; the rest are unrelated."""
    (ax, ay), (bx, by) = _centre(a), _centre(b)
    return ((ax - bx) ** 2 + (ay - by) ** 2) ** 0.5 < max(scene.width, scene.height) / 2


def phrase_grounding(scene, rng: random.Random, spanned_caption) -> dict:
    shapes = list(scene.shapes)
    rng.shuffle(shapes)
    text, spans = spanned_caption(shapes)
    return {"image": scene.file_name, "caption": text, "tokens_positive": [[span] for span in spans],
            "bbox_list": [list(shape.box) for shape in shapes]}


def vrd_record(scene, relation) -> dict | None:
    if len(scene.shapes) < 2:
        return None
    scale = BOX_SCALE / max(scene.width, scene.height)
    relations = [[i, j, PREDICATES.index(RELATION_PREDICATE[relation(a, b)]) + 1]
                 for i, a in enumerate(scene.shapes) for j, b in enumerate(scene.shapes)
                 if i != j and related(a, b, scene)]
    return {"image": scene.file_name, "width": scene.width, "height": scene.height,
            "boxes": [[round(value * scale, 2) for value in shape.box] for shape in scene.shapes],
            "labels": [KIND_CLASSES.index(shape.kind) + 1 for shape in scene.shapes], "relations": relations}


def _grounded(words: list[str | tuple[str, object]]) -> tuple[str, list[list[int]], list[list[int]]]:
    """A question from plain words and (phrase, shape) pairs: text, spans of the phrases, their boxes."""
    text, spans, boxes = "", [], []
    for word in words:
        if text:
            text += " "
        if isinstance(word, tuple):
            phrase, shape = word
            spans.append([len(text), len(text) + len(phrase)])
            boxes.append(list(shape.box))
            word = phrase
        text += word
    return text, spans, boxes


def gqa_questions(scene, rng: random.Random, relation) -> list[tuple[str, str, list, list]]:
    """Two (question, answer, spans, boxes) of different kinds."""
    shape = rng.choice(scene.shapes)
    the = ("the", (shape.kind, shape))
    kinds = {
        "colour": ([ "what", "color", "is", *the, "?"], shape.colour),
        "size": (["what", "size", "is", *the, "?"], shape.size),
        "count": (["how", "many", "shapes", "are", "there", "?"], NUMBER_WORDS[len(scene.shapes)]),
    }
    if len(scene.shapes) > 1:
        other = rng.choice([s for s in scene.shapes if s is not shape])
        answer = "yes" if relation(shape, other) == "left of" else "no"
        kinds["left"] = (["is", *the, "left", "of", "the", (other.kind, other), "?"], answer)
    questions = []
    for name in rng.sample(sorted(kinds), 2):
        words, answer = kinds[name]
        text, spans, boxes = _grounded(words)
        questions.append((text.replace(" ?", "?"), answer, spans, boxes))
    return questions


def vcr_record(scene, rng: random.Random, relation, colours: tuple[str, ...], annot_id: str) -> dict | None:
    if len(scene.shapes) < 2:
        return None
    i, j = rng.sample(range(len(scene.shapes)), 2)
    a, b = scene.shapes[i], scene.shapes[j]
    truth = RELATION_PREDICATE[relation(a, b)]
    answers = [[[i], "is", *predicate.split(), [j]] for predicate in PREDICATES]
    others = rng.sample([c for c in colours if c != a.colour], 3)
    rationale_colours = [a.colour, *others]
    rng.shuffle(rationale_colours)
    return {"image": scene.file_name, "width": scene.width, "height": scene.height,
            "names": [shape.kind for shape in scene.shapes],
            "bbox_list": [[*map(float, shape.box), 1.0] for shape in scene.shapes],
            "question": ["where", "is", [i], "?"], "answer_choices": answers,
            "answer_label": PREDICATES.index(truth),
            "rationale_choices": [[[i], "is", colour] for colour in rationale_colours],
            "rationale_label": rationale_colours.index(a.colour), "annot_id": annot_id}


def pevl_annotations(splits: dict[str, list], seed: int, *, relation, spanned_caption,
                     colours: tuple[str, ...]) -> dict[str, object]:
    """Every PEVL task file's content by file name (see the module docstring)."""
    files: dict[str, object] = {
        "vrd_dict.json": {"idx_to_label": {str(i + 1): name for i, name in enumerate(KIND_CLASSES)},
                          "idx_to_predicate": {str(i + 1): name for i, name in enumerate(PREDICATES)}},
        "gqa_answer_list.json": sorted({*colours, *KIND_CLASSES, "small", "large", "yes", "no", *NUMBER_WORDS[1:]}),
    }
    q_id = 0
    for split, scenes in splits.items():
        files[f"phrase_grounding_{split}.json"] = [
            phrase_grounding(s, random.Random(f"{seed}:phrases:{s.image_id}"), spanned_caption) for s in scenes]
        files[f"vrd_{split}.json"] = [record for s in scenes if (record := vrd_record(s, relation))]
        gqa, vcr = [], []
        rng = random.Random(f"{seed}:gqa:{split}")
        for s in scenes:
            for question, answer, spans, boxes in gqa_questions(s, rng, relation):
                gqa.append({"image": s.file_name, "question": question, "answer": answer, "tokens_positive": spans,
                            "bbox_list": boxes, "no_bbox": int(not spans), "q_id": q_id})
                q_id += 1
        rng = random.Random(f"{seed}:vcr:{split}")
        for s in scenes:
            if record := vcr_record(s, rng, relation, colours, f"{split}-{s.image_id}"):
                vcr.append(record)
        files[f"gqa_{split}.json"], files[f"vcr_{split}.json"] = gqa, vcr
    return files
