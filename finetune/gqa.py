"""GQA by prompt (PEVL): a grounded question, then six masked answer slots read by the MLM head.

    python -m finetune.gqa --config finetune/configs/gqa_gqa.yaml --checkpoint gqa_second_stage/checkpoints
    python -m finetune.gqa --config finetune/configs/gqa_synth.yaml --checkpoint runs/demo-pevl/pretrain/checkpoints

Data: ``data_shards build --format gqa`` (PEVL's GQA records: ``question``, ``answer``, ``tokens_positive`` spans of
the grounded phrases with their ``bbox_list``, ``no_bbox``; ``data_shards.pevl_formats``) and
``options.answer_list``, a JSON list of the answers to rank (PEVL ranks GQA's 1,853).

Prompt (PEVL's ``dataset/vqa_dataset.py``): the question with a position marker after each grounded phrase, then
``[SEP]`` and ``[MASK]`` x6. Training: cross-entropy on the six slots against the answer's tokens padded with
``[PAD]`` (PEVL scores the padding slots too). A flip swaps left/right in the question and the answer (the loader's
rule for ``json.question`` / ``json.answers``), as PEVL does.

Evaluation (PEVL's ``gqa_val``): every answer of the list scores the sum of its tokens' log-probabilities at their
slots (padding unscored) over its number of tokens; the best one is the prediction. ``accuracy`` in percent, with
``chance`` the better of a uniform pick from the list and always answering the split's most frequent answer.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from finetune.loop import DataError, TaskSpec, run
from finetune.prompting import Candidate, assemble, backbone_with_positions, freeze, rank_candidates, slot_logits
from pretrain.config import ConfigError
from pretrain.text.positions import insert_positions, quantise_box, with_position_tokens

ANSWER_SLOTS = 6


@dataclass(frozen=True)
class Options:
    answer_list: str = ""                # JSON list of candidate answers

    def __post_init__(self) -> None:
        if not self.answer_list:
            raise ConfigError("options.answer_list: give the JSON list of answers to rank")


def normalise_answer(answer: str) -> str:
    return " ".join(answer.lower().split())


class Answers:
    """The answer list as slot candidates (each answer's first six tokens)."""

    def __init__(self, path: str, tokenizer):
        if not os.path.isfile(path):
            raise ConfigError(f"options.answer_list={path!r} does not exist")
        with open(path) as handle:
            answers = json.load(handle)
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise ConfigError(f"options.answer_list={path!r}: expected a non-empty JSON list of strings")
        self.answers = [normalise_answer(answer) for answer in answers]
        self.candidates = [Candidate(tuple(enumerate(ids[:ANSWER_SLOTS])), max(1, min(len(ids), ANSWER_SLOTS)))
                           for ids in answer_token_ids(tokenizer, self.answers)]


def answer_token_ids(tokenizer, answers: list[str]) -> list[list[int]]:
    encoded = tokenizer(answers)
    return [ids[1:int(mask.sum())].tolist() for ids, mask in zip(encoded["input_ids"], encoded["attention_mask"],
                                                                   strict=True)]


def grounded_question(text: str, meta: dict, width: float, height: float) -> str:
    """The question with each grounded phrase followed by its position marker."""
    regions = [region for region in meta.get("regions") or [] if region.get("span") is not None]
    if not regions:
        return text
    return insert_positions(text, [region["span"] for region in regions],
                            [quantise_box(region["box"], width, height) for region in regions])


class GQABatch:
    """Loader-side adapter: question prompt rows with six masked slots; ``targets`` the answer's slot ids."""

    def __init__(self, tokenizer, options: Options, train: bool):
        self.tokenizer = with_position_tokens(tokenizer)
        self.train = train

    def __call__(self, batch: dict) -> dict:
        height, width = batch["image"].shape[-2:]
        rows, answers = [], []
        mask, sep = self.tokenizer.mask_token_id, self.tokenizer.sep_token_id
        for key, text, meta in zip(batch["__key__"], batch["text"], batch["meta"], strict=True):
            given = [entry["answer"] for entry in meta.get("answers") or [] if isinstance(entry, dict)]
            if self.train and not given:
                raise DataError(f"GQA sample {key!r} has no answer (json.answers); build with --format gqa")
            answers.append(normalise_answer(given[0]) if given else "")
            rows.append([grounded_question(text, meta, width, height), (sep,), (mask,) * ANSWER_SLOTS])
        tokens, starts = assemble(self.tokenizer, rows)
        slots = torch.tensor([[start[2] + slot for slot in range(ANSWER_SLOTS)] for start in starts])
        targets = torch.full((len(rows), ANSWER_SLOTS), self.tokenizer.pad_token_id, dtype=torch.long)
        for row, ids in enumerate(answer_token_ids(self.tokenizer, [answer or "x" for answer in answers])):
            targets[row, : min(len(ids), ANSWER_SLOTS)] = torch.tensor(ids[:ANSWER_SLOTS])
        return {**batch, "input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"],
                "slots": slots, "targets": targets, "answer": answers}


class GQATask(nn.Module):
    """forward(batch) -> {"loss", "answer"}; predict(batch) -> the best answer of the list per question."""

    def __init__(self, model, tokenizer, options: Options):
        super().__init__()
        self.model, self.options = model, options
        self.__dict__["tokenizer"] = with_position_tokens(tokenizer)
        self.__dict__["answers"] = Answers(options.answer_list, self.tokenizer)
        freeze(model.itm_head, model.vision_proj, model.text_proj, model.temp)

    def backbone_to_task(self, state: dict) -> dict:
        return backbone_with_positions(state, self.tokenizer)

    def forward(self, batch: dict) -> dict:
        logits = slot_logits(self.model, batch["image"], batch["input_ids"], batch["attention_mask"], batch["slots"])
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch["targets"].flatten())
        return {"loss": loss, "answer": loss}

    def predict(self, batch: dict) -> list[dict]:
        logits = slot_logits(self.model, batch["image"], batch["input_ids"], batch["attention_mask"], batch["slots"])
        scores = rank_candidates(logits.float().log_softmax(-1), self.answers.candidates)
        best = scores.argmax(dim=1).tolist()
        return [{"key": key, "predicted": self.answers.answers[index], "answer": answer}
                for key, index, answer in zip(batch["__key__"], best, batch["answer"], strict=True)]


def evaluate(context) -> dict:
    predictions = context.predictions()
    correct = sum(p["predicted"] == p["answer"] for p in predictions)
    counts = Counter(p["answer"] for p in predictions)
    answers = context.module.answers.answers
    return {"accuracy": 100.0 * correct / len(predictions), "samples": len(predictions),
            "chance": 100.0 * max(1 / len(answers), counts.most_common(1)[0][1] / len(predictions))}


def build_task(model, tokenizer, options: Options) -> nn.Module:
    return GQATask(model, tokenizer, options)


SPEC = TaskSpec(name="gqa", options=Options, build=build_task,
                adapter=lambda tokenizer, options, train: GQABatch(tokenizer, options, train),
                evaluate=evaluate, metric="accuracy")


if __name__ == "__main__":
    sys.exit(run(SPEC))
