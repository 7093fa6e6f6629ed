"""``python -m data_shards concepts``: ViCHA's visual concepts for every image, from a vocabulary of caption nouns.

ViCHA's offline step (reference/methods.md section 2): the nouns of a dataset's captions form a vocabulary
(``data_shards.nouns``: nouns seen at least ``--min-count`` times), an image-text model scores every
vocabulary word against every image, and the ``--top-k`` best (15) become the image's ``kwords``. ViCHA
used CLIP; the scorer here is any checkpoint this project loads (``pretrain.scorer``: a pretraining run, an
exported file, a released ALBEF/ViCHA file with ``--config``), so nothing is downloaded::

    python -m data_shards concepts --captions data/coco_train.json --captions data/vg.json --min-count 2 \\
        --checkpoint runs/albef/checkpoints --vocabulary-out data/concepts.json \\
        --input data/coco_train.json --output data/coco_train_kw.json --image-root data/images
    python -m data_shards concepts --vocabulary data/concepts.json --checkpoint runs/albef/checkpoints \\
        --input 'shards/cc3m-{000000..000099}.tar' --output shards_kw/      # shards in, shards out

- ``--input`` annotation files (JSON list or ``.jsonl``, any format with ``image``, ``file_name`` or NLVR2's
  ``images`` pair) get ``kwords`` on every record (NLVR2: ``kwords1`` and ``kwords2``) in a new file at the
  matching ``--output``; ``data_shards build`` then keeps them as ``json.concepts``. Shard inputs (a ``.tar``
  pattern) are rewritten shard by shard into the ``--output`` folder, every member kept and
  ``json.concepts`` added, with the ``.idx`` files and ``sizes.json`` the builder writes.
- Images are scored in batches of ``--batch-size`` (each distinct image once), with a progress bar.
- Resumable: an annotation output grows a ``.progress.jsonl`` beside it, one line per scored image, flushed
  every batch; a re-run skips what it holds and removes it when the output is written. Shard outputs are
  written whole or not at all, and a re-run skips the shards already there.

``precision_at_k`` scores chosen concepts against known true words (the synthetic world knows them).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections import Counter
from collections.abc import Iterator

import torch
from tqdm import tqdm

from data_shards import storage
from data_shards.boxes import TransformConfig
from data_shards.dali_index import INDEX_VERSION, IndexedTarWriter, index_from_members
from data_shards.image_refs import ImageReferenceRefused, ImageReferences
from data_shards.nouns import noun_vocabulary
from data_shards.reader import ShardReader
from data_shards.tar_samples import is_image_extension, iter_samples
from data_shards.transforms import PilTransform

CAPTION_FIELDS = ("caption", "sentence", "text", "normal_caption")


class ConceptsError(ValueError):
    """A problem with the command's inputs; the message names the file or option."""


def is_shards(spec: str) -> bool:
    return any(url.endswith(".tar") for url in storage.expand_urls(spec))


def read_records(path: str) -> list[dict]:
    """An annotation file's records: a JSON list, or one JSON object per line (``.jsonl``)."""
    try:
        with open(path, encoding="utf-8") as handle:
            if path.endswith(".jsonl"):
                return [json.loads(line) for line in handle if line.strip()]
            records = json.load(handle)
    except FileNotFoundError:
        raise ConceptsError(f"annotation file {path!r} does not exist") from None
    except json.JSONDecodeError as error:
        raise ConceptsError(f"annotation file {path!r} is not valid JSON: {error}") from None
    if not isinstance(records, list):
        raise ConceptsError(f"annotation file {path!r} must hold a JSON list of records")
    return records


def write_records(path: str, records: list[dict]) -> None:
    """Written whole under a temporary name, then renamed: a reader never sees half a file."""
    with storage.atomic_write(path) as sink:
        if path.endswith(".jsonl"):
            sink.write("".join(json.dumps(record) + "\n" for record in records).encode())
        else:
            sink.write(json.dumps(records).encode())


def captions_of(spec: str) -> Iterator[str]:
    """Every caption of an annotation file (``caption`` str or list, ``sentence``, ``text``) or of shards
    (``txt`` and ``json.captions``)."""
    if is_shards(spec):
        for sample in ShardReader(spec, rank=0, world_size=1, shard_shuffle=False):
            meta = sample.get("json") or {}
            texts = meta.get("captions") or ([sample["txt"]] if sample.get("txt") else [])
            yield from (text for text in texts if isinstance(text, str))
        return
    for record in read_records(spec):
        for field in CAPTION_FIELDS:
            value = record.get(field) if isinstance(record, dict) else None
            for text in value if isinstance(value, list) else [value]:
                if isinstance(text, str):
                    yield text


def top_concepts(image_features: torch.Tensor, word_features: torch.Tensor, vocabulary: list[str],
                 k: int) -> list[list[str]]:
    """The ``k`` vocabulary words most similar to each image (cosine of unit features), best first."""
    similarity = image_features.float() @ word_features.float().T
    indices = similarity.topk(min(k, len(vocabulary)), dim=1).indices
    return [[vocabulary[index] for index in row] for row in indices.tolist()]


def precision_at_k(chosen: dict[str, list[str]], truth: dict[str, set[str]], k: int = 5) -> dict:
    """Per image, the share of its first ``k`` concepts that are true words, out of ``min(k, len(true words))``
    (a plural counts as its singular); the mean over images, and the share of images at 1.0."""
    def singular(word: str) -> str:
        return word[:-1] if word.endswith("s") and not word.endswith("ss") else word

    scores = []
    for image, words in truth.items():
        wanted = {singular(word) for word in words}
        found = {singular(word) for word in chosen.get(image, [])[:k]} & wanted
        scores.append(len(found) / min(k, len(wanted)) if wanted else 1.0)
    return {f"precision_at_{k}": sum(scores) / max(1, len(scores)),
            "images_recovered": sum(score == 1.0 for score in scores) / max(1, len(scores)), "images": len(scores)}


def record_images(record: dict) -> list[str]:
    """The image paths of one record: NLVR2's ``images`` pair, else ``image``, ``file_name`` or ``image_rpath``."""
    if isinstance(record.get("images"), list):
        return [str(path) for path in record["images"]]
    for field in ("image", "file_name", "image_rpath"):
        if isinstance(record.get(field), str):
            return [record[field]]
    raise ConceptsError(f"record {json.dumps(record)[:120]} names no image (image, file_name, images)")


class ImageScorer:
    """Batches of images (bytes) -> their top-k concepts, through a scorer's image tower."""

    def __init__(self, scorer, vocabulary: list[str], k: int, prompt: str = "{}"):
        self.scorer, self.vocabulary, self.k = scorer, vocabulary, k
        self.words = scorer.text_features([prompt.format(word) for word in vocabulary])
        self.render = PilTransform(TransformConfig(image_size=scorer.image_size, train=False))
        self.chosen: dict[str, list[str]] = {}  # by image path: files of one run that share images score them once

    def __call__(self, images: list[tuple[str, bytes]]) -> list[list[str]]:
        """``[(name, bytes)]`` -> one concept list per image."""
        pixels = torch.stack([self.render(image_sample(name, data))["image"] for name, data in images])
        return top_concepts(self.scorer.image_features(pixels), self.words, self.vocabulary, self.k)


def image_sample(name: str, data: bytes) -> dict:
    """A raw sample holding one image's bytes under its extension, as the decoders take it."""
    extension = os.path.splitext(name)[1].lower().lstrip(".")
    return {"__key__": name, {"jpeg": "jpg", "": "jpg"}.get(extension, extension): data}


def read_progress(path: str) -> dict[str, object]:
    """What a killed run wrote to its ``.progress.jsonl``: ``{"key", "value"}`` lines, by key."""
    done: dict[str, object] = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    break  # a line cut by a kill: everything before it stands
                done[entry["key"]] = entry["value"]
    return done


def annotate_file(path: str, output: str, image_root: str, image_scorer: ImageScorer, batch_size: int) -> int:
    """``kwords`` (NLVR2: ``kwords1``/``kwords2``) on every record of ``path``, written to ``output``."""
    records = read_records(path)
    references = ImageReferences(image_root)
    images = list(dict.fromkeys(image for record in records for image in record_images(record)))
    progress_path = output + ".progress.jsonl"
    done = {**{image: image_scorer.chosen[image] for image in images if image in image_scorer.chosen},
            **read_progress(progress_path)}
    todo = [image for image in images if image not in done]
    with open(progress_path, "a", encoding="utf-8") as log, tqdm(total=len(images), initial=len(images) - len(todo),
                                                                  desc=f"concepts {os.path.basename(path)}",
                                                                  unit="img", file=sys.stderr) as bar:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            loaded = [(image, image_bytes(references, image)) for image in chunk]
            for image, concepts in zip(chunk, image_scorer(loaded), strict=True):
                done[image] = concepts
                log.write(json.dumps({"key": image, "value": concepts}) + "\n")
            log.flush()
            bar.update(len(chunk))
    for record in records:
        found = [done[image] for image in record_images(record)]
        if isinstance(record.get("images"), list) and len(found) == 2:
            record["kwords1"], record["kwords2"] = found
        else:
            record["kwords"] = found[0]
    write_records(output, records)
    os.remove(progress_path)
    image_scorer.chosen.update({image: done[image] for image in images})
    return len(images)


def image_bytes(references: ImageReferences, image: str) -> bytes:
    try:
        path = references.resolve(image)
    except ImageReferenceRefused as refused:
        raise ConceptsError(f"image {image!r}: {refused}") from None
    candidates = [path] + ([path + ".jpg"] if not os.path.splitext(path)[1] else [])  # SNLI-VE ids
    for candidate in candidates:
        if storage.exists(candidate):
            return storage.read_bytes(candidate)
    raise ConceptsError(f"image {image!r} not found under --image-root ({path})")


def _members(sample: dict) -> list[tuple[str, bytes]]:
    members = []
    for extension, value in sample.items():
        if extension.startswith("__"):
            continue
        if extension == "json":
            value = json.dumps(value).encode()
        elif isinstance(value, str):
            value = value.encode()
        members.append((extension, value))
    return members


def annotate_shards(spec: str, output_dir: str, image_scorer: ImageScorer, batch_size: int) -> int:
    """Every shard of ``spec`` copied into ``output_dir`` with ``json.concepts`` added; finished shards skipped."""
    sizes_path = storage.join(output_dir, "sizes.json")
    sizes = json.loads(storage.read_bytes(sizes_path)) if storage.exists(sizes_path) else {}
    images = 0
    for url in tqdm(storage.expand_urls(spec), desc="concepts shards", unit="shard", file=sys.stderr):
        name = url.rpartition("/")[2]
        target = storage.join(output_dir, name)
        if storage.exists(target) and storage.exists(target[:-len(".tar")] + ".idx"):
            continue
        skipped: Counter = Counter()
        with storage.open_read(url) as stream:
            samples = list(iter_samples(stream, url, skipped))
        if skipped:
            print(f"concepts: {url}: skipped {dict(skipped)}", file=sys.stderr)
        pairs = [(index, extension) for index, sample in enumerate(samples) for extension in sorted(sample)
                 if not extension.startswith("__") and is_image_extension(extension)]
        chosen: dict[tuple[int, str], list[str]] = {}
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            found = image_scorer([(f"{samples[i]['__key__']}.{extension}", samples[i][extension])
                                  for i, extension in chunk])
            chosen.update(zip(chunk, found, strict=True))
        with storage.atomic_write(target) as sink:
            writer = IndexedTarWriter(sink)
            for index, sample in enumerate(samples):
                lists = [chosen[(i, extension)] for i, extension in pairs if i == index]
                meta = dict(sample.get("json") or {})
                meta["concepts"] = lists[0] if len(lists) == 1 else lists
                writer.add_sample(sample["__key__"], _members({**sample, "json": meta}))
            writer.close()
        text = index_from_members(writer.entries) if writer.entries else f"{INDEX_VERSION} 0\n"
        with storage.atomic_write(target[:-len(".tar")] + ".idx") as sink:
            sink.write(text.encode())
        sizes[name] = len(samples)
        with storage.atomic_write(sizes_path) as sink:
            sink.write(json.dumps(sizes, indent=1, sort_keys=True).encode())
        images += len(pairs)
    return images


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m data_shards concepts", description=__doc__.splitlines()[0])
    parser.add_argument("--captions", action="append", default=[],
                        help="annotation file or shard pattern whose captions make the vocabulary (repeatable)")
    parser.add_argument("--min-count", type=int, default=2, help="keep nouns seen at least this often (2)")
    parser.add_argument("--vocabulary", help="a JSON list of concept words made earlier (instead of --captions)")
    parser.add_argument("--vocabulary-out", help="write the vocabulary built from --captions here")
    parser.add_argument("--checkpoint", required=True, help="the scorer: a checkpoint this project loads")
    parser.add_argument("--config", help="experiment YAML whose model section describes the checkpoint")
    parser.add_argument("--trust-checkpoint", action="store_true", help="open pickles with the full unpickler")
    parser.add_argument("--input", action="append", default=[], help="annotation file or shard pattern (repeatable)")
    parser.add_argument("--output", action="append", default=[],
                        help="output file (annotation input) or folder (shard input), one per --input")
    parser.add_argument("--image-root", default=".", help="folder the annotation image paths are relative to")
    parser.add_argument("--top-k", type=int, default=15, help="concepts per image (ViCHA: 15)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--prompt", default="{}", help="text each word is scored as, {} standing for the word "
                        "(default: the bare word, as ViCHA scores it)")
    return parser.parse_args(argv)


def build_vocabulary(args: argparse.Namespace) -> list[str]:
    if args.vocabulary:
        with open(args.vocabulary, encoding="utf-8") as handle:
            vocabulary = json.load(handle)
        if not isinstance(vocabulary, list) or not all(isinstance(word, str) for word in vocabulary):
            raise ConceptsError(f"--vocabulary {args.vocabulary!r} must hold a JSON list of words")
    else:
        if not args.captions:
            raise ConceptsError("give --captions (files or shards to build the vocabulary from) or --vocabulary")
        vocabulary = noun_vocabulary((caption for spec in args.captions for caption in captions_of(spec)),
                                     args.min_count)
    if not vocabulary:
        raise ConceptsError(f"the vocabulary is empty: no noun is seen {args.min_count} times; lower --min-count")
    if args.vocabulary_out:
        write_records(args.vocabulary_out, vocabulary)
    return vocabulary


def main(argv: list[str]) -> int:
    args = parse_arguments(argv)
    try:
        if len(args.input) != len(args.output):
            raise ConceptsError(f"give one --output per --input ({len(args.input)} inputs, {len(args.output)} outputs)")
        if args.top_k < 1 or args.batch_size < 1 or args.min_count < 1:
            raise ConceptsError("--top-k, --batch-size and --min-count must be at least 1")
        vocabulary = build_vocabulary(args)
        print(f"concepts: vocabulary of {len(vocabulary)} nouns: {', '.join(vocabulary[:20])}"
              f"{' ...' if len(vocabulary) > 20 else ''}", file=sys.stderr)
        if not args.input:
            return 0
        # The scorer is a model: its code lives in pretrain, which reads data through this package, so it is
        # imported here, by name, only when a command needs it.
        scorer_module = importlib.import_module("pretrain.scorer")
        try:
            scorer = scorer_module.load_scorer(args.checkpoint, args.config, trusted=args.trust_checkpoint)
        except (scorer_module.ScorerError, FileNotFoundError) as error:
            raise ConceptsError(f"--checkpoint: {error}") from None
        if "{}" not in args.prompt:
            raise ConceptsError(f"--prompt {args.prompt!r} must hold {{}} where the word goes")
        image_scorer = ImageScorer(scorer, vocabulary, args.top_k, args.prompt)
        for spec, output in zip(args.input, args.output, strict=True):
            if is_shards(spec):
                count = annotate_shards(spec, output, image_scorer, args.batch_size)
            else:
                count = annotate_file(spec, output, args.image_root, image_scorer, args.batch_size)
            print(f"concepts: {count} images of {spec} -> {output}", file=sys.stderr)
    except ConceptsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
