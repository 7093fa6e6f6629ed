"""Source-format adapters: one annotation file in a method's own format -> records in the shard data contract.

Used by the builder (``python -m data_shards build --format FMT``) through
``iter_records(fmt, path, image_root, detections=None, allowed_schemes=())``, which yields a
``SourceRecord`` per good record and a ``Reject`` (with a short, stable reason and a detail) per malformed
one. Inputs are JSON lists or JSON lines (``.jsonl``, as X-VLM ships them). Image strings are resolved by
:class:`~data_shards.image_refs.ImageReferences`: paths under ``image_root``, s3/hdfs URLs only where
allowed, never ``pipe:`` or other schemes. Boxes leave here as xyxy float pixels of the original image,
never clipped (the builder clips, drops and rescales them). Image existence is the builder's check.

format   record read                                            meta written (besides source, image_id)
albef    {image, caption: str | [str]}                          captions
xvlm     {image | image_rpath, caption?, elems: [{caption, attributes?, bb: xywh}]}
                                                                regions [{box, text, label}], captions?
pevl     {image | file_name, caption | normal_caption, tokens_positive: [[start, end]] per box,
         bbox_list: xyxy}                                       regions [{box, text, span}]
vicha    {image, caption: str | [str], kwords: [str]}          captions, concepts
coco     {image, caption: str | [str], image_id?}              captions, image_id (default: record index)
caption  same as coco (Karpathy)                                captions, image_id (default: record index)
vqa      {question_id, question, answer?: [str] | str, image, dataset?}
                                                                question_id, question, answers [{answer,
                                                                count}], dataset, split (from the file name)
nlvr2    {images: [a, b], sentence, label: "True" | "False"}   sentence, label (bool)
ve       {image (".jpg" added when it has no extension), sentence,
         label: entailment | neutral | contradiction}
                                                                sentence, label
refcoco  {image, text, ref_id, bbox: xywh} + detections file {image: [xywh, ...]}
                                                                ref_id, text, box, proposals (xyxy)
vrd, gqa, vcr  PEVL's task formats: ``data_shards.pevl_formats``

Every format also keeps ViCHA's visual concepts where a record has them: ``kwords: [str]`` -> ``concepts``
(NLVR2: ``kwords1`` and ``kwords2``, one list per image -> ``concepts: [[str], [str]]``), as
``python -m data_shards concepts`` writes them.

A ``.jsonl`` line that is not UTF-8 JSON is one rejected record (``invalid JSON line``, its detail naming
the line number); the lines after it still count.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from data_shards import pevl_formats
from data_shards.image_refs import REFUSED_REASON, ImageReferenceRefused, ImageReferences

FORMATS: tuple[str, ...] = (
    "albef", "xvlm", "pevl", "vicha", "coco", "vqa", "nlvr2", "ve", "refcoco", "caption", "vrd", "gqa", "vcr")
VE_LABELS = ("entailment", "neutral", "contradiction")
BAD_LINE_REASON = "invalid JSON line"


@dataclass(frozen=True)
class SourceRecord:
    origin: str  # "<input file name>#<record index>" for messages and manifest
    image_paths: list[str]  # resolved against image_root; 1 path, or 2 for nlvr2 (order kept)
    text: str  # the main caption -> the sample's `txt` member
    meta: dict  # -> the sample's `json` member, in the DESIGN.md data contract


@dataclass(frozen=True)
class Reject:
    origin: str
    reason: str  # a short stable category used to count rejects
    detail: str = ""  # what exactly was wrong (the value, the line number), kept as a manifest example


class AnnotationFileError(ValueError):
    """An annotation or detections file that cannot be read as records; the message names the file."""


class _RecordProblem(Exception):
    """Raised inside a record parser; becomes a Reject with ``reason`` and ``detail``."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def _malformed(detail: str) -> _RecordProblem:
    return _RecordProblem(f"malformed record: {detail}")


def _required(record: dict, *names: str) -> object:
    """The first of ``names`` present in the record (formats spell some fields two ways)."""
    for name in names:
        if name in record:
            return record[name]
    raise _malformed(f"missing field '{names[0]}'")


def _string(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise _malformed(f"field '{name}' must be a string")
    return value


def _text(value: object, name: str) -> str:
    """A caption-like string; blank ones reject the record as an empty caption."""
    text = _string(value, name).strip()
    if not text:
        raise _RecordProblem("empty caption")
    return text


def _texts(value: object, name: str) -> list[str]:
    """A string or a list of strings; blank entries are dropped, none left rejects as an empty caption."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise _malformed(f"field '{name}' must be a string or a list of strings")
    texts = [item.strip() for item in items if item.strip()]
    if not texts:
        raise _RecordProblem("empty caption")
    return texts


def _image(value: object, name: str = "image") -> str:
    if not isinstance(value, str) or not value.strip():
        raise _malformed(f"field '{name}' must be a non-empty string")
    return value


def _identifier(value: object, name: str) -> int | str:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise _malformed(f"field '{name}' must be an integer or a string")
    return value


def _box(value: object, name: str, xywh: bool) -> list[float]:
    """Four finite numbers -> xyxy floats; X-VLM, COCO and RefCOCO store [x, y, w, h]."""
    if not isinstance(value, list | tuple) or len(value) != 4 or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        raise _malformed(f"field '{name}' must be a list of 4 numbers")
    x1, y1, third, fourth = (float(v) for v in value)
    return [x1, y1, x1 + third, y1 + fourth] if xywh else [x1, y1, third, fourth]


def _captioned(record: dict, index: int, fmt: str) -> tuple[list[str], str, dict]:
    """albef, vicha, coco and caption: an image with one or several captions."""
    image = _image(_required(record, "image"))
    captions = _texts(_required(record, "caption"), "caption")
    meta: dict = {"captions": captions}
    if fmt in ("coco", "caption"):  # ALBEF's eval sets number images by position
        meta["image_id"] = _identifier(record.get("image_id", index), "image_id")
    if fmt == "vicha":
        concepts = _required(record, "kwords")
        if not isinstance(concepts, list) or not all(isinstance(c, str) for c in concepts):
            raise _malformed("field 'kwords' must be a list of strings")
        meta["concepts"] = concepts
    return [image], captions[0], meta


def _xvlm(record: dict, index: int, fmt: str) -> tuple[list[str], str, dict]:
    image = _image(_required(record, "image", "image_rpath"))
    elems = _required(record, "elems")
    if not isinstance(elems, list) or not elems or not all(isinstance(e, dict) for e in elems):
        raise _malformed("field 'elems' must be a non-empty list of objects")
    regions = []
    for elem in elems:
        attributes = elem.get("attributes", [])
        attributes = [attributes] if isinstance(attributes, str) else attributes
        if not isinstance(attributes, list) or not all(isinstance(a, str) for a in attributes):
            raise _malformed("field 'attributes' must be a string or a list of strings")
        label = next((a.strip() for a in attributes if a.strip()), None)
        regions.append({"box": _box(_required(elem, "bb"), "bb", xywh=True),
                        "text": _texts(_required(elem, "caption"), "caption")[0], "label": label})
    meta: dict = {"regions": regions}
    if "caption" in record:
        meta["captions"] = _texts(record["caption"], "caption")
        return [image], meta["captions"][0], meta
    return [image], regions[0]["text"], meta  # region-only records (Visual Genome) have no image caption


def _span(value: object, caption: str) -> list[int]:
    """One box's tokens_positive entry: [start, end] or MDETR's [[start, end], ...] (the first one counts)."""
    span = value[0] if isinstance(value, list) and value and isinstance(value[0], list) else value
    if not (isinstance(span, list) and len(span) == 2 and all(type(v) is int for v in span)
            and 0 <= span[0] < span[1] <= len(caption)):
        raise _malformed("field 'tokens_positive' must hold [start, end] spans inside the caption")
    return span


def _pevl(record: dict, index: int, fmt: str) -> tuple[list[str], str, dict]:
    image = _image(_required(record, "image", "file_name"), "image")
    caption = _string(_required(record, "caption", "normal_caption"), "caption")
    if not caption.strip():
        raise _RecordProblem("empty caption")
    spans, boxes = _required(record, "tokens_positive"), _required(record, "bbox_list")
    if not isinstance(spans, list) or not isinstance(boxes, list) or len(spans) != len(boxes):
        raise _malformed("fields 'tokens_positive' and 'bbox_list' must be lists of the same length")
    regions = []
    for span_value, box in zip(spans, boxes, strict=True):
        start, end = _span(span_value, caption)  # spans index the caption as given, so it is not stripped
        regions.append({"box": _box(box, "bbox_list", xywh=False), "text": caption[start:end],
                        "span": [start, end]})
    return [image], caption, {"regions": regions}


def _vqa(record: dict, index: int, fmt: str) -> tuple[list[str], str, dict]:
    meta: dict = {"question_id": _identifier(_required(record, "question_id"), "question_id")}
    image = _image(_required(record, "image"))
    meta["question"] = _text(_required(record, "question"), "question")
    answers = record.get("answer", [])  # test questions come without answers
    answers = [answers] if isinstance(answers, str) else answers  # Visual Genome QA has one answer
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise _malformed("field 'answer' must be a string or a list of strings")
    counts: dict[str, int] = {}
    for answer in answers:  # dicts keep first-seen order
        counts[answer] = counts.get(answer, 0) + 1
    meta["answers"] = [{"answer": answer, "count": count} for answer, count in counts.items()]
    meta["dataset"] = _string(record.get("dataset", "vqa"), "dataset")
    return [image], meta["question"], meta


def _nlvr2(record: dict, index: int, fmt: str) -> tuple[list[str], str, dict]:
    images = _required(record, "images")
    if not isinstance(images, list) or len(images) != 2:
        raise _malformed("field 'images' must be a list of 2 image paths")
    paths = [_image(path, "images") for path in images]
    sentence = _text(_required(record, "sentence"), "sentence")
    label = _required(record, "label")
    if label not in ("True", "False"):
        raise _malformed("field 'label' must be one of 'True', 'False'")
    return paths, sentence, {"sentence": sentence, "label": label == "True"}


def _ve(record: dict, index: int, fmt: str) -> tuple[list[str], str, dict]:
    image = _image(_required(record, "image"))
    if not os.path.splitext(image)[1]:  # SNLI-VE names Flickr images by id; ALBEF appends ".jpg"
        image += ".jpg"
    sentence = _text(_required(record, "sentence"), "sentence")
    label = _required(record, "label")
    if label not in VE_LABELS:
        raise _malformed("field 'label' must be one of 'entailment', 'neutral', 'contradiction'")
    return [image], sentence, {"sentence": sentence, "label": label}


def _refcoco(record: dict, index: int, fmt: str) -> tuple[list[str], str, dict]:
    image = _image(_required(record, "image"))
    text = _text(_required(record, "text"), "text")
    meta = {"ref_id": _identifier(_required(record, "ref_id"), "ref_id"), "text": text,
            "box": _box(_required(record, "bbox"), "bbox", xywh=True)}
    return [image], text, meta


def _pevl_task(parse: Callable) -> Callable[[dict, int, str], tuple[list[str], str, dict]]:
    """A ``data_shards.pevl_formats`` parser with this module's field helpers and reject reasons."""
    return lambda record, index, fmt: parse(record, _required, _image, _malformed)


PARSERS: dict[str, Callable[[dict, int, str], tuple[list[str], str, dict]]] = {
    "albef": _captioned, "vicha": _captioned, "coco": _captioned, "caption": _captioned, "xvlm": _xvlm,
    "pevl": _pevl, "vqa": _vqa, "nlvr2": _nlvr2, "ve": _ve, "refcoco": _refcoco,
    "vrd": _pevl_task(pevl_formats.vrd), "gqa": _pevl_task(pevl_formats.gqa), "vcr": _pevl_task(pevl_formats.vcr),
}


def _concepts(record: dict, fmt: str) -> list | None:
    """ViCHA's ``kwords`` (NLVR2: ``kwords1``/``kwords2``) when the record has them, checked; else None."""
    fields = ("kwords1", "kwords2") if fmt == "nlvr2" else ("kwords",)
    if not any(name in record for name in fields):
        return None
    lists = []
    for name in fields:
        words = _required(record, name)
        if not isinstance(words, list) or not all(isinstance(word, str) for word in words):
            raise _malformed(f"field {name!r} must be a list of strings")
        lists.append(words)
    return lists if fmt == "nlvr2" else lists[0]


def _open_text(path: str, what: str, *, binary: bool = False):
    try:
        return open(path, "rb") if binary else open(path, encoding="utf-8")
    except FileNotFoundError:
        raise AnnotationFileError(f"{what} file {path} not found; check the path") from None
    except OSError as error:
        raise AnnotationFileError(f"cannot read {what} file {path}: {error.strerror}") from None


def _load_json(path: str, what: str) -> object:
    with _open_text(path, what) as handle:
        try:
            return json.load(handle)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise AnnotationFileError(f"{what} file {path} is not valid JSON ({error}); "
                                      "pass a JSON list of records or a .jsonl file") from None


@dataclass(frozen=True)
class _BadLine:
    """A line of a .jsonl file that is not UTF-8 JSON; it stands in the record stream as one rejected record."""

    detail: str


def _json_lines(path: str) -> Iterator[object]:
    """The records of a .jsonl file; a broken line becomes a ``_BadLine`` so the lines after it still count."""
    # Bytes, decoded line by line: one line that is not UTF-8 must not end the file.
    with _open_text(path, "annotation", binary=True) as handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a byte order mark some editors write
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                yield _BadLine(f"line {number}: not UTF-8 (byte 0x{raw[error.start]:02x} at column "
                               f"{error.start + 1})")
                continue
            if not line.strip():
                continue
            try:
                # Without its line break, so an error at the line's end is reported on this line.
                yield json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as error:
                yield _BadLine(f"line {number}: {error.msg} at column {error.colno}")


def load_detections(path: str) -> dict[str, list[list[float]]]:
    """A RefCOCO detections file {image: [[x, y, w, h], ...]} -> {image: [xyxy, ...]}."""
    content = _load_json(path, "detections")
    if not isinstance(content, dict):
        raise AnnotationFileError(f"detections file {path} must hold a JSON object "
                                  "{image: [[x, y, w, h], ...]}")
    detections = {}
    for key, boxes in content.items():
        try:
            if not isinstance(boxes, list):
                raise _malformed("not a list")
            detections[key] = [_box(box, "proposals", xywh=True) for box in boxes]
        except _RecordProblem:
            raise AnnotationFileError(f"detections file {path}: entry {key!r} must be a list of "
                                      "[x, y, w, h] boxes") from None
    return detections


def iter_records(fmt: str, path: str, image_root: str, *, detections: str | None = None,
                 allowed_schemes: tuple[str, ...] = ()) -> Iterator[SourceRecord | Reject]:
    """Yield one SourceRecord or Reject per record of ``path``; file-level problems raise at call time.

    ``allowed_schemes`` ("s3", "hdfs") lets image URLs of those schemes outside ``image_root`` through.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown annotation format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if detections is not None and fmt != "refcoco":
        raise ValueError(f"a detections file only applies to the refcoco format, not {fmt!r}")
    references = ImageReferences(image_root, allowed_schemes)
    proposals = load_detections(detections) if detections is not None else {}
    if path.endswith(".jsonl"):
        _open_text(path, "annotation").close()  # a missing file fails now, not at the first record
        records: Iterator[object] = _json_lines(path)
    else:
        content = _load_json(path, "annotation")
        if not isinstance(content, list):
            raise AnnotationFileError(f"annotation file {path} must hold a JSON list of records, "
                                      f"found a JSON {type(content).__name__}")
        records = iter(content)
    split = re.search(r"(?:^|[_.-])(train|val|test)(?:[_.-]|$)", os.path.basename(path))
    return _records(fmt, path, references, records, proposals, split.group(1) if split else None)


def _records(fmt: str, path: str, references: ImageReferences, records: Iterator[object],
             proposals: dict[str, list[list[float]]], split: str | None) -> Iterator[SourceRecord | Reject]:
    name = os.path.basename(path)
    for index, record in enumerate(records):
        origin = f"{name}#{index}"
        try:
            if isinstance(record, _BadLine):
                raise _RecordProblem(BAD_LINE_REASON, record.detail)
            if not isinstance(record, dict):
                raise _malformed("not a JSON object")
            images, text, meta = PARSERS[fmt](record, index, fmt)
            if "image_id" in record and "image_id" not in meta:
                meta["image_id"] = _identifier(record["image_id"], "image_id")
            concepts = _concepts(record, fmt)
            if concepts is not None and "concepts" not in meta:
                meta["concepts"] = concepts
            if fmt == "vqa" and record.get("split", split) is not None:
                meta["split"] = _string(record.get("split", split), "split")
            image_paths = [references.resolve(image) for image in images]
        except ImageReferenceRefused as refused:
            yield Reject(origin, REFUSED_REASON, str(refused))
            continue
        except _RecordProblem as problem:
            yield Reject(origin, problem.reason, problem.detail)
            continue
        if fmt == "refcoco":
            image_id = str(record.get("image_id", ""))
            meta["proposals"] = proposals.get(images[0], proposals.get(image_id, []))
        meta = {"source": fmt, **meta}
        yield SourceRecord(origin, image_paths, text, meta)
