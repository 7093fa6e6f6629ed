"""Source formats of PEVL's tasks for the builder: ``vrd``, ``gqa`` and ``vcr`` (``data_shards build --format``).

``data_shards.adapters`` lists these parsers beside its own; each turns one record into (image paths, ``txt``,
``json``) in the shard data contract, raising ``RecordProblem`` (``adapters._RecordProblem``) for a record it
rejects. Objects that texts refer to by index become ``regions`` that keep their ``index``: the builder drops a
region whose box is empty and a crop can drop one too, so tasks find objects by that index, not by position.

format  record read                                                         json written
vrd     {image | file_name, width, height (or img_info: {width, height}),   regions [{box, label: class, index}],
        boxes | bbox_list: [[x1, y1, x2, y2]] at box_scale (1024: VG-SGG,   relations [[subject, object,
        the longer side scaled to 1024; 0: pixels), labels | gt_classes,    predicate]]
        relations: [[subject, object, predicate]]}
gqa     {image | file_name, question, answer, tokens_positive: [[s, e]],    question, answers [{answer, count}],
        bbox_list: [[x1, y1, x2, y2]], no_bbox, q_id}                       question_id, regions [{box, text,
                                                                            span}] (spans into the question)
vcr     {image | file_name, names, bbox_list: [[x1, y1, x2, y2(, score)]],  question, answer_choices,
        question, answer_choices, rationale_choices: token lists whose      rationale_choices, answer_label,
        [i, ...] items refer to objects, answer_label, rationale_label,     rationale_label, annot_id,
        annot_id}                                                           regions [{box, label: name, index}]

``txt`` is the question (gqa, vcr: object references written as their names) or a list of the objects (vrd).
"""

from __future__ import annotations

from collections.abc import Callable

VG_BOX_SCALE = 1024


def _list_of_boxes(value: object, name: str, problem: Callable) -> list[list[float]]:
    if not isinstance(value, list) or not all(isinstance(box, list) and len(box) >= 4 for box in value):
        raise problem(f"field '{name}' must be a list of [x1, y1, x2, y2] boxes")
    try:
        return [[float(number) for number in box[:4]] for box in value]
    except (TypeError, ValueError):
        raise problem(f"field '{name}' must hold numbers") from None


def _size(record: dict, problem: Callable) -> tuple[float, float]:
    info = record.get("img_info", record)
    width, height = info.get("width"), info.get("height")
    if not all(isinstance(value, int | float) and value > 0 for value in (width, height)):
        raise problem("fields 'width' and 'height' (or img_info) must be positive numbers")
    return float(width), float(height)


def vrd(record: dict, required: Callable, image: Callable, problem: Callable) -> tuple[list[str], str, dict]:
    path = image(required(record, "image", "file_name"))
    boxes = _list_of_boxes(required(record, "boxes", "bbox_list"), "boxes", problem)
    labels = required(record, "labels", "gt_classes")
    relations = required(record, "relations")
    if not isinstance(labels, list) or len(labels) != len(boxes) or not all(type(v) is int for v in labels):
        raise problem("field 'labels' must hold one class index per box")
    if not isinstance(relations, list) or not all(
            isinstance(r, list) and len(r) == 3 and all(type(v) is int for v in r)
            and 0 <= r[0] < len(boxes) and 0 <= r[1] < len(boxes) for r in relations):
        raise problem("field 'relations' must hold [subject, object, predicate] with indices into 'boxes'")
    box_scale = record.get("box_scale", VG_BOX_SCALE)
    if box_scale:
        width, height = _size(record, problem)
        scale = max(width, height) / float(box_scale)
        boxes = [[value * scale for value in box] for box in boxes]
    regions = [{"box": box, "label": label, "index": index}
               for index, (box, label) in enumerate(zip(boxes, labels, strict=True))]
    text = " ".join(f"object {index}" for index in range(len(boxes)))
    return [path], text or "no objects", {"regions": regions, "relations": relations}


def gqa(record: dict, required: Callable, image: Callable, problem: Callable) -> tuple[list[str], str, dict]:
    path = image(required(record, "image", "file_name"))
    question = required(record, "question")
    if not isinstance(question, str) or not question.strip():
        raise problem("field 'question' must be a non-empty string")
    answer = record.get("answer", "")
    if not isinstance(answer, str):
        raise problem("field 'answer' must be a string")
    spans, boxes = record.get("tokens_positive") or [], record.get("bbox_list") or []
    if record.get("no_bbox", 0) == 1:
        spans, boxes = [], []
    boxes = _list_of_boxes(boxes, "bbox_list", problem)
    if not isinstance(spans, list) or len(spans) != len(boxes) or not all(
            isinstance(s, list) and len(s) == 2 and all(type(v) is int for v in s) and 0 <= s[0] < s[1] <= len(question)
            for s in spans):
        raise problem("field 'tokens_positive' must hold one [start, end] span inside the question per box")
    meta = {"question": question, "answers": [{"answer": answer, "count": 1}] if answer else [],
            "question_id": record.get("q_id", record.get("question_id", "")),
            "regions": [{"box": box, "text": question[s:e], "span": [s, e]}
                        for (s, e), box in zip(spans, boxes, strict=True)]}
    return [path], question, meta


def _refers(tokens: object, count: int) -> bool:
    return isinstance(tokens, list) and all(
        isinstance(token, str) or (isinstance(token, list) and all(type(i) is int and 0 <= i < count for i in token))
        for token in tokens)


def vcr(record: dict, required: Callable, image: Callable, problem: Callable) -> tuple[list[str], str, dict]:
    path = image(required(record, "image", "file_name"))
    names = required(record, "names")
    boxes = _list_of_boxes(required(record, "bbox_list"), "bbox_list", problem)
    if not isinstance(names, list) or len(names) != len(boxes) or not all(isinstance(n, str) for n in names):
        raise problem("field 'names' must hold one name per box")
    meta: dict = {"regions": [{"box": box, "label": name, "index": index}
                              for index, (box, name) in enumerate(zip(boxes, names, strict=True))]}
    for field in ("question", "answer_choices", "rationale_choices"):
        value = record.get(field)
        if field == "question" and not _refers(value, len(boxes)):
            raise problem("field 'question' must be a token list whose lists index 'names'")
        if field != "question" and value is not None and not (
                isinstance(value, list) and all(_refers(choice, len(boxes)) for choice in value)):
            raise problem(f"field '{field}' must be a list of token lists whose lists index 'names'")
        if value is not None:
            meta[field] = value
    if "answer_choices" not in meta:
        raise problem("missing field 'answer_choices'")
    for field, choices in (("answer_label", "answer_choices"), ("rationale_label", "rationale_choices")):
        label = record.get(field)
        if label is not None:
            if type(label) is not int or not 0 <= label < len(meta.get(choices) or []):
                raise problem(f"field '{field}' must index '{choices}'")
            meta[field] = label
    meta["annot_id"] = record.get("annot_id", "")
    text = " ".join(token if isinstance(token, str) else " and ".join(names[i] for i in token)
                    for token in meta["question"])
    return [path], text, meta
