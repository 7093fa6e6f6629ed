"""Visual relation detection by prompt (PEVL), predicate classification given the objects' boxes and classes.

    python -m finetune.vrd --config finetune/configs/vrd_vg.yaml --checkpoint vrd.pth
    python -m finetune.vrd --config finetune/configs/vrd_synth.yaml --checkpoint runs/demo-pevl/pretrain/checkpoints

Data: ``data_shards build --format vrd`` (VG-SGG-style records: boxes, classes, ``relations`` [subject, object,
predicate]; ``data_shards.pevl_formats``) and ``options.dictionary``, a VG-SGG dictionary file
(``VG-SGG-dicts-with-attri.json``: ``idx_to_label``, ``idx_to_predicate``; ``vrd_dict.json`` in the synthetic world).

Prompt (PEVL's ``dataset/vrd_dataset.py``): ``"<subject> @@ p p p p ## [MASK] [MASK] [MASK] <object> @@ p p p p ##"``
with both boxes as position tokens; the predicate fills the three slots, padded with ``[unrel]`` (``[unused714]``),
and an unrelated pair is ``[unrel] [unrel] [unrel]``. Training: one pair per image, unrelated with probability
``unrelated_probability`` (PEVL's training files hold three unrelated pairs per related one), cross-entropy on
the three slots. PEVL adds momentum distillation; fine-tuning here starts without momentum copies, so the loss is
the plain cross-entropy.

Evaluation (PEVL's ``vrd_inference`` and ``eval_vg``): every ordered pair of an image's objects is prompted
once; each predicate scores the sum of its tokens' log-probabilities (padding ``[unrel]`` slots unscored) over its
number of words. A pair's prediction is its best predicate other than ``[unrel]``, pairs are ranked by that score,
and R@K is the share of the image's annotated triples among its top K, averaged over images with relations.
mR@K averages, per predicate, the recall over the images holding it, then over the predicates the split
annotates (PEVL averages over all 50 VG predicates, counting absent ones as 0). ``chance`` is R@50 of uniformly
random scores (the mean of 20 draws), ``chance_mean_r50`` the same for mR@50.
"""

from __future__ import annotations

import json
import os
import random
import sys
import zlib
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from finetune.loop import DataError, TaskSpec, run
from finetune.prompting import Candidate, assemble, backbone_with_positions, freeze, rank_candidates, slot_logits
from pretrain.config import ConfigError
from pretrain.text.positions import UNRELATED, marker_text, quantise_box, with_position_tokens

PREDICATE_SLOTS = 3
RECALL_AT = (20, 50, 100)


@dataclass(frozen=True)
class Options:
    dictionary: str = ""                  # VG-SGG dictionary: idx_to_label, idx_to_predicate
    unrelated_probability: float = 0.75   # share of training prompts on an unrelated pair (PEVL: 3 of 4)

    def __post_init__(self) -> None:
        if not self.dictionary:
            raise ConfigError("options.dictionary: give the VG-SGG dictionary file (idx_to_label, idx_to_predicate)")
        if not 0.0 <= self.unrelated_probability <= 1.0:
            raise ConfigError(f"options.unrelated_probability={self.unrelated_probability}: must lie in [0, 1]")


class Vocabulary:
    """Class names and predicates (index 0: unrelated) with the predicate candidates to rank."""

    def __init__(self, path: str, tokenizer):
        if not os.path.isfile(path):
            raise ConfigError(f"options.dictionary={path!r} does not exist")
        with open(path) as handle:
            content = json.load(handle)
        try:
            self.labels = {int(key): value for key, value in content["idx_to_label"].items()}
            predicates = {int(key): value for key, value in content["idx_to_predicate"].items()}
        except (KeyError, ValueError, AttributeError):
            raise ConfigError(f"options.dictionary={path!r}: expected idx_to_label and idx_to_predicate "
                              "objects keyed by numbers") from None
        self.predicates = [UNRELATED] + [predicates[index] for index in sorted(predicates)]
        unrelated = tokenizer.token_id(UNRELATED)
        words = tokenizer([predicate.lower() for predicate in self.predicates[1:]])
        self.slot_ids, self.candidates = [(unrelated,) * PREDICATE_SLOTS], [Candidate(((0, unrelated),), 3)]
        for predicate, ids, mask in zip(self.predicates[1:], words["input_ids"], words["attention_mask"],
                                        strict=True):
            pieces = ids[1:int(mask.sum())].tolist()[:PREDICATE_SLOTS]
            padded = tuple(pieces + [unrelated] * (PREDICATE_SLOTS - len(pieces)))
            self.slot_ids.append(padded)
            self.candidates.append(Candidate(tuple((slot, token) for slot, token in enumerate(pieces)),
                                             len(predicate.split())))


def objects_of(meta: dict) -> dict[int, dict]:
    """The sample's objects by their index (regions a crop or the builder dropped are absent)."""
    return {int(region["index"]): region for region in meta.get("regions") or [] if "index" in region}


def pair_prompt(objects: dict[int, dict], vocabulary: Vocabulary, subject: int, obj: int, width: float,
                height: float, unrelated_id: int) -> list:
    def named(index: int) -> str:
        region = objects[index]
        return vocabulary.labels.get(int(region["label"]), str(region["label"])) + marker_text(
            quantise_box(region["box"], width, height))
    return [named(subject), (unrelated_id,) * PREDICATE_SLOTS, named(obj)]


class VRDBatch:
    """Loader-side adapter: one prompt row per (image, pair); ``targets`` the three slot ids (training)."""

    def __init__(self, tokenizer, options: Options, train: bool):
        self.tokenizer = with_position_tokens(tokenizer, unrelated=True)
        self.vocabulary = Vocabulary(options.dictionary, self.tokenizer)
        self.options, self.train = options, train
        self.unrelated = self.tokenizer.token_id(UNRELATED)
        self.calls = 0

    def __call__(self, batch: dict) -> dict:
        height, width = batch["image"].shape[-2:]
        rows, samples, pairs, targets, relations = [], [], [], [], []
        for index, (key, meta) in enumerate(zip(batch["__key__"], batch["meta"], strict=True)):
            objects = objects_of(meta)
            related = {(s, o): p for s, o, p in meta.get("relations") or [] if s in objects and o in objects}
            relations.append([[s, o, p] for (s, o), p in related.items()])
            ordered = [(s, o) for s in objects for o in objects if s != o]
            if self.train:
                if not ordered:
                    raise DataError(f"VRD sample {key!r} has fewer than two objects; nothing to relate")
                rng = random.Random(zlib.crc32(f"{key}:{self.calls}".encode()))
                unrelated = [pair for pair in ordered if pair not in related]
                if unrelated and (not related or rng.random() < self.options.unrelated_probability):
                    chosen = [rng.choice(unrelated)]
                else:
                    chosen = [rng.choice(sorted(related))]
            else:
                chosen = ordered
            for subject, obj in chosen:
                rows.append(pair_prompt(objects, self.vocabulary, subject, obj, width, height, self.unrelated))
                samples.append(index)
                pairs.append([subject, obj])
                targets.append(self.vocabulary.slot_ids[related.get((subject, obj), 0)])
        self.calls += 1
        if not rows:
            # A batch of single-object images still runs one forward (ZeRO-3 forwards are collective): a
            # placeholder row of sample -1, which predict ignores.
            rows, samples, pairs = [["object", (self.unrelated,) * PREDICATE_SLOTS, "object"]], [-1], [[0, 0]]
            targets.append(self.vocabulary.slot_ids[0])
        tokens, starts = assemble(self.tokenizer, rows)
        slots = torch.tensor([[start[1] + slot for slot in range(PREDICATE_SLOTS)] for start in starts])
        sample = torch.tensor(samples)
        return {"__key__": batch["__key__"], "image": batch["image"][sample.clamp(min=0)],
                "input_ids": tokens["input_ids"],
                "attention_mask": tokens["attention_mask"], "slots": slots, "targets": torch.tensor(targets),
                "sample": sample, "pairs": torch.tensor(pairs), "relations": relations}


class VRDTask(nn.Module):
    """forward(batch) -> {"loss", "predicate"}; predict(batch) -> per image its pairs' predicate scores."""

    def __init__(self, model, tokenizer, options: Options):
        super().__init__()
        self.model, self.options = model, options
        self.__dict__["tokenizer"] = with_position_tokens(tokenizer, unrelated=True)
        self.__dict__["vocabulary"] = Vocabulary(options.dictionary, self.tokenizer)
        freeze(model.itm_head, model.vision_proj, model.text_proj, model.temp)

    def backbone_to_task(self, state: dict) -> dict:
        return backbone_with_positions(state, self.tokenizer, unrelated=True)

    def forward(self, batch: dict) -> dict:
        logits = slot_logits(self.model, batch["image"], batch["input_ids"], batch["attention_mask"], batch["slots"])
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch["targets"].flatten())
        return {"loss": loss, "predicate": loss}

    def predict(self, batch: dict) -> list[dict]:
        records = [{"key": key, "pairs": [], "scores": [], "relations": relations}
                   for key, relations in zip(batch["__key__"], batch["relations"], strict=True)]
        logits = slot_logits(self.model, batch["image"], batch["input_ids"], batch["attention_mask"], batch["slots"])
        scores = rank_candidates(logits.float().log_softmax(-1), self.vocabulary.candidates).cpu()
        for row, sample in enumerate(batch["sample"].tolist()):
            if sample >= 0:
                records[sample]["pairs"].append(batch["pairs"][row].tolist())
                records[sample]["scores"].append(scores[row].tolist())
        return records


def image_recalls(pairs: list[list[int]], scores: torch.Tensor, relations: list[list[int]],
                  k: int) -> tuple[float, dict[int, float]]:
    """One image's recall of its annotated triples among the top ``k`` predictions, overall and per predicate."""
    predicates = scores[:, 1:].argmax(dim=1) + 1
    best = scores[torch.arange(len(predicates)), predicates]
    order = torch.argsort(best, descending=True, stable=True)[:k]
    predicted = {(pairs[i][0], pairs[i][1], int(predicates[i])) for i in order.tolist()}
    hits = [tuple(relation) in predicted for relation in relations]
    per_predicate = {}
    for predicate, count in Counter(relation[2] for relation in relations).items():
        per_predicate[predicate] = sum(hit for hit, r in zip(hits, relations, strict=True) if r[2] == predicate) / count
    return sum(hits) / len(relations), per_predicate


def recall_metrics(records: list[dict]) -> dict[str, float]:
    """R@K and mR@K (percent) over the images that have relations (module docstring)."""
    metrics = {}
    scored = [record for record in records if record["relations"] and record["pairs"]]
    missing = [record for record in records if record["relations"] and not record["pairs"]]
    for k in RECALL_AT:
        recalls, per_predicate = [0.0] * len(missing), {}
        for record in scored:
            recall, predicates = image_recalls(record["pairs"], torch.tensor(record["scores"]), record["relations"], k)
            recalls.append(recall)
            for predicate, value in predicates.items():
                per_predicate.setdefault(predicate, []).append(value)
        metrics[f"r{k}"] = 100.0 * sum(recalls) / max(len(recalls), 1)
        means = [sum(values) / len(values) for values in per_predicate.values()]
        metrics[f"mean_r{k}"] = 100.0 * sum(means) / max(len(means), 1)
    return metrics


def evaluate(context) -> dict:
    records = context.predictions()
    metrics = recall_metrics(records)
    generator = torch.Generator().manual_seed(0)
    draws = [recall_metrics([{**record, "scores": torch.rand(len(record["pairs"]), len(record["scores"][0]),
                                                             generator=generator).tolist()
                              if record["pairs"] else []} for record in records]) for _ in range(20)]
    metrics["chance"] = sum(draw["r50"] for draw in draws) / len(draws)
    metrics["chance_mean_r50"] = sum(draw["mean_r50"] for draw in draws) / len(draws)
    metrics["images"] = sum(1 for record in records if record["relations"])
    return metrics


def build_task(model, tokenizer, options: Options) -> nn.Module:
    return VRDTask(model, tokenizer, options)


SPEC = TaskSpec(name="vrd", options=Options, build=build_task,
                adapter=lambda tokenizer, options, train: VRDBatch(tokenizer, options, train),
                evaluate=evaluate, metric="r50")


if __name__ == "__main__":
    sys.exit(run(SPEC))
