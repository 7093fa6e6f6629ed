"""``python -m data_shards filter``: ViCHA's CLIP-filtered recipes, with this project's image-text scorer.

ViCHA's "800K" set keeps all of COCO, the best-scoring 50% of Visual Genome's captions of EVERY image and the
best-scoring 70% of SBU's pairs (its ``filter_topk_dataset`` and ``filter_topk_per_image_dataset``). Each
(image, caption) pair gets the cosine of the scorer's ITC features (``pretrain.scorer``; ViCHA used CLIP):

    python -m data_shards filter --input data/sbu.json --output data/sbu_70.json --keep 0.7 \\
        --checkpoint runs/albef/checkpoints --image-root data/images
    python -m data_shards filter --input data/vg.json --output data/vg_50.json --keep 0.5 --per-image ...

- per dataset (default): the best ``int(keep * pairs)`` pairs of the file, as ViCHA;
- ``--per-image``: for every image, the best ``int(keep * its pairs)`` of its captions, and at least one, so
  every image stays (ViCHA's ``int`` alone drops an image with a single caption at ``keep`` < 1).

Records keep their fields and order; a record whose ``caption`` is a list keeps the chosen captions in their
order (and is dropped when none is chosen); each kept record gets ``sim`` (a list for a caption list).
Pairs are scored in batches with a progress bar; a ``.progress.jsonl`` beside the output keeps the scores
done so far, so a killed run resumes, and is removed when the output is written.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections import defaultdict

import torch
from tqdm import tqdm

from data_shards.boxes import TransformConfig
from data_shards.concepts import ConceptsError, image_bytes, image_sample, read_progress, read_records, write_records
from data_shards.image_refs import ImageReferences
from data_shards.transforms import PilTransform


def pairs_of(records: list[dict]) -> list[tuple[int, int, str, str]]:
    """``(record index, caption index, image, caption)`` for every caption of every record."""
    pairs = []
    for index, record in enumerate(records):
        image, caption = record.get("image") if isinstance(record, dict) else None, None
        if isinstance(record, dict):
            caption = record.get("caption")
        captions = caption if isinstance(caption, list) else [caption]
        if not isinstance(image, str) or not captions or not all(isinstance(text, str) for text in captions):
            raise ConceptsError(f"record {index} needs an image path and a caption (str or list of str): "
                                f"{json.dumps(record)[:120]}")
        pairs.extend((index, position, image, text) for position, text in enumerate(captions))
    return pairs


def choose(scores: dict[tuple[int, int], float], images: dict[tuple[int, int], str], keep: float,
           per_image: bool) -> set[tuple[int, int]]:
    """The kept pairs: the best ``int(keep * n)`` overall, or per image (at least one each)."""
    ranked = sorted(scores, key=lambda pair: (-scores[pair], pair))
    if not per_image:
        return set(ranked[:int(keep * len(ranked))])
    by_image: dict[str, list] = defaultdict(list)
    for pair in ranked:
        by_image[images[pair]].append(pair)
    return {pair for group in by_image.values() for pair in group[:max(1, int(keep * len(group)))]}


def filtered_records(records: list[dict], scores: dict, kept: set) -> list[dict]:
    result = []
    for index, record in enumerate(records):
        captions = record["caption"] if isinstance(record["caption"], list) else [record["caption"]]
        chosen = [position for position in range(len(captions)) if (index, position) in kept]
        if not chosen:
            continue
        record = dict(record)
        if isinstance(record["caption"], list):
            record["caption"] = [captions[position] for position in chosen]
            record["sim"] = [scores[(index, position)] for position in chosen]
        else:
            record["sim"] = scores[(index, 0)]
        result.append(record)
    return result


def score_pairs(pairs, scorer, image_root: str, batch_size: int, progress_path: str) -> dict[tuple[int, int], float]:
    """Cosine of image and caption ITC features for every pair; resumes from ``progress_path``."""
    done = {tuple(map(int, key.split(":"))): value for key, value in read_progress(progress_path).items()}
    todo = [pair for pair in pairs if (pair[0], pair[1]) not in done]
    references = ImageReferences(image_root)
    render = PilTransform(TransformConfig(image_size=scorer.image_size, train=False))
    with open(progress_path, "a", encoding="utf-8") as log, tqdm(total=len(pairs), initial=len(pairs) - len(todo),
                                                                  desc="filter", unit="pair", file=sys.stderr) as bar:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            images = list(dict.fromkeys(image for _, _, image, _ in chunk))
            pixels = torch.stack([render(image_sample(image, image_bytes(references, image)))["image"]
                                  for image in images])
            image_features = scorer.image_features(pixels)
            text_features = scorer.text_features([caption for _, _, _, caption in chunk])
            rows = torch.tensor([images.index(image) for _, _, image, _ in chunk])
            similarity = (image_features[rows] * text_features).sum(dim=1).tolist()
            for (index, position, _, _), value in zip(chunk, similarity, strict=True):
                done[(index, position)] = value
                log.write(json.dumps({"key": f"{index}:{position}", "value": value}) + "\n")
            log.flush()
            bar.update(len(chunk))
    return done


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m data_shards filter", description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="annotation file: records with image and caption")
    parser.add_argument("--output", required=True, help="the filtered annotation file")
    parser.add_argument("--keep", type=float, required=True, help="fraction of pairs kept, in (0, 1]")
    parser.add_argument("--per-image", action="store_true", help="keep the fraction per image (every image stays)")
    parser.add_argument("--checkpoint", required=True, help="the scorer: a checkpoint this project loads")
    parser.add_argument("--config", help="experiment YAML whose model section describes the checkpoint")
    parser.add_argument("--trust-checkpoint", action="store_true", help="open pickles with the full unpickler")
    parser.add_argument("--image-root", default=".", help="folder the annotation image paths are relative to")
    parser.add_argument("--batch-size", type=int, default=64)
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_arguments(argv)
    try:
        if not 0.0 < args.keep <= 1.0:
            raise ConceptsError(f"--keep {args.keep}: give the fraction of pairs to keep, in (0, 1]")
        if args.batch_size < 1:
            raise ConceptsError("--batch-size must be at least 1")
        records = read_records(args.input)
        pairs = pairs_of(records)
        # The scorer is a model; its code lives in pretrain, imported by name only when a command needs it.
        scorer_module = importlib.import_module("pretrain.scorer")
        try:
            scorer = scorer_module.load_scorer(args.checkpoint, args.config, trusted=args.trust_checkpoint)
        except (scorer_module.ScorerError, FileNotFoundError) as error:
            raise ConceptsError(f"--checkpoint: {error}") from None
        progress_path = args.output + ".progress.jsonl"
        scores = score_pairs(pairs, scorer, args.image_root, args.batch_size, progress_path)
        kept = choose(scores, {(index, position): image for index, position, image, _ in pairs}, args.keep,
                      args.per_image)
        result = filtered_records(records, scores, kept)
        write_records(args.output, result)
        os.remove(progress_path)
        print(f"filter: kept {len(kept)} of {len(pairs)} pairs ({len(result)} of {len(records)} records) -> "
              f"{args.output}", file=sys.stderr)
    except ConceptsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
