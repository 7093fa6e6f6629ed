"""Referring expressions and phrase grounding by prompt (PEVL): the box is read from four masked position slots.

    python -m finetune.prompt_grounding --config finetune/configs/prompt_grounding_refcoco.yaml \
        --checkpoint grounding.pth
    python -m finetune.prompt_grounding --config finetune/configs/prompt_grounding_synth.yaml \
        --checkpoint runs/demo-pevl/pretrain/checkpoints [--evaluate]

Data: ``data_shards build --format refcoco`` (RefCOCO/+/g: ``txt`` the expression, ``json.box`` its box; one
prompt per sample) or ``--format pevl`` (Flickr30k Entities in MDETR's format: ``txt`` the caption, ``json.regions``
with each phrase's ``span`` and ``box``; training prompts one random phrase per sample, evaluation every phrase).

Prompt (PEVL's ``run_grounding_train.py``): ``"<expression> @@ [MASK] [MASK] [MASK] [MASK] ##"``, or for a phrase
the caption with that marker right after the phrase (``options.other_boxes: shown`` also writes the other
phrases' true markers, as pretraining sees captions). Training: the soft position loss on the four slots
(``pretrain.objectives.position``; PEVL's fine-tuning weight 1, decay 0.15). Inference: one step, argmax over the
bins at each slot, bins -> pixels of the image the model sees (``dequantise_box``), no proposals.

Metrics: ``accuracy`` = Acc@IoU>=0.5 (IoU does not change when both boxes are rescaled, so it is measured in the
model's pixels); ``exact`` and ``within_8`` = the share of slots whose bin is right, or at most 8 bins off;
``chance`` = the accuracy of always predicting the split's mean box, and ``chance_random_proposal`` that of a
random detector proposal when the shards carry proposals (``finetune.report`` takes the higher);
``chance_exact`` and ``chance_within_8`` = the bin metrics of predicting each slot's mean bin over the split.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import zlib
from dataclasses import dataclass

import torch
from torch import nn

from finetune.loop import DataError, TaskSpec, run
from finetune.metrics.grounding import accuracy_at_iou
from finetune.prompting import backbone_with_positions, freeze, slot_logits
from pretrain.config import ConfigError
from pretrain.objectives.box import cxcywh_to_xyxy, xyxy_to_cxcywh
from pretrain.objectives.position import GROUP_SIZE, soft_position_loss, soft_position_targets
from pretrain.report import merge_into_summary
from pretrain.text.cleaning import clean_caption
from pretrain.text.pevl_batch import MAX_WORDS
from pretrain.text.positions import (
    BOX_OPEN,
    NUM_BINS,
    dequantise_box,
    insert_positions,
    quantise_box,
    with_position_tokens,
)

OTHER_BOXES = ("hidden", "shown")


@dataclass(frozen=True)
class Options:
    decay: float = 0.15                # exp_decay_ratio of the soft targets (PEVL grounding)
    soft_weight: float = 1.0           # PEVL's fine-tuning loss has no postoken_temp
    normalisation: str = "vocabulary"  # as pretrain.objectives.position
    other_boxes: str = "hidden"        # phrase prompts: the caption's other phrases without / with their markers
    within_bins: int = 8               # the "within" metric's tolerance

    def __post_init__(self) -> None:
        if self.other_boxes not in OTHER_BOXES:
            raise ConfigError(f"options.other_boxes={self.other_boxes!r}: use one of {', '.join(OTHER_BOXES)}")
        if self.decay <= 0:
            raise ConfigError(f"options.decay={self.decay}: must be positive")


def phrase_prompts(text: str, meta: dict, width: float, height: float, choose: int | None,
                   other_boxes: str = "hidden") -> list[tuple[str, list[float], int]]:
    """``(prompt text with true markers, target box, rank of the target's marker in the prompt)`` per target of
    one sample: every phrase (``choose`` None) or the phrase at ``choose`` modulo their number; a referring
    expression (``json.box``) is one target spanning the whole text."""
    regions = [region for region in meta.get("regions") or [] if region.get("span") is not None]
    if not regions:
        if meta.get("box") is None:
            raise DataError("a grounding sample needs json.box (--format refcoco) or regions with spans "
                            "(--format pevl)")
        bins = quantise_box(meta["box"], width, height)
        return [(insert_positions(text, [(0, len(text))], [bins]), [float(value) for value in meta["box"]], 0)]
    targets = range(len(regions)) if choose is None else [choose % len(regions)]
    prompts = []
    for index in targets:
        # Markers come out in the order of the spans written, so the target's marker is its rank among them.
        shown = list(range(len(regions))) if other_boxes == "shown" else [index]
        prompt = insert_positions(text, [regions[i]["span"] for i in shown],
                                  [quantise_box(regions[i]["box"], width, height) for i in shown])
        prompts.append((prompt, [float(value) for value in regions[index]["box"]], shown.index(index)))
    return prompts


class PromptGroundingBatch:
    """Loader-side adapter: one row per prompt, its four slots masked; ``bins`` the true bins, ``box`` the target
    (xyxy, pixels of the transformed image), ``sample`` the row's sample, the image repeated per row."""

    def __init__(self, tokenizer, options: Options, train: bool):
        self.tokenizer = with_position_tokens(tokenizer)
        self.options, self.train = options, train
        self.positions = self.tokenizer.group_ids("position")
        self.box_open = self.tokenizer.token_id(BOX_OPEN)
        self.calls = 0

    def __call__(self, batch: dict) -> dict:
        height, width = batch["image"].shape[-2:]
        texts, boxes, samples, groups = [], [], [], []
        for index, (key, text, meta) in enumerate(zip(batch["__key__"], batch["text"], batch["meta"], strict=True)):
            choose = zlib.crc32(f"{key}:{self.calls}".encode()) if self.train else None
            try:
                prompts = phrase_prompts(text, meta, width, height, choose, self.options.other_boxes)
            except DataError as error:
                raise DataError(f"grounding sample {key!r}: {error}") from None
            for prompt, box, group in prompts:
                texts.append(clean_caption(prompt, MAX_WORDS, keep=self.tokenizer.markers).text)
                boxes.append(box)
                groups.append(group)
                samples.append(index)
        self.calls += 1
        tokens = self.tokenizer(texts)
        input_ids = tokens["input_ids"]
        slots = torch.zeros(len(texts), GROUP_SIZE, dtype=torch.long)
        for row, group in enumerate(groups):
            opens = (input_ids[row] == self.box_open).nonzero().flatten().tolist()
            start = opens[group] + 1 if group < len(opens) else input_ids.shape[1]
            slots[row] = torch.arange(start, start + GROUP_SIZE)
            if start + GROUP_SIZE > input_ids.shape[1] or not all(
                    int(input_ids[row, column]) in self.positions for column in slots[row].tolist()):
                raise DataError(f"grounding sample {batch['__key__'][samples[row]]!r}: its prompt was cut inside the "
                                f"position slots ({len(texts[row].split())} words); raise model.max_text_length")
        bins = input_ids.gather(1, slots) - self.positions.start
        masked = input_ids.scatter(1, slots, self.tokenizer.mask_token_id)
        sample = torch.tensor(samples)
        return {"__key__": batch["__key__"], "image": batch["image"][sample], "text": texts, "input_ids": masked,
                "attention_mask": tokens["attention_mask"], "slots": slots, "bins": bins,
                "box": torch.tensor(boxes, dtype=torch.float32), "sample": sample,
                "proposals": [batch["meta"][index].get("proposals") or [] for index in samples]}


class PromptGroundingTask(nn.Module):
    """forward(batch) -> {"loss", "soft"}; predict(batch) -> one record per sample with its prompts' boxes."""

    def __init__(self, model, tokenizer, options: Options):
        super().__init__()
        self.model, self.options = model, options
        self.__dict__["tokenizer"] = with_position_tokens(tokenizer)  # not a module: kept out of the state dict
        self.positions = self.tokenizer.group_ids("position")
        self.soft_targets = soft_position_targets(NUM_BINS, options.decay)
        freeze(model.itm_head, model.vision_proj, model.text_proj, model.temp)

    def backbone_to_task(self, state: dict) -> dict:
        return backbone_with_positions(state, self.tokenizer)

    def forward(self, batch: dict) -> dict:
        logits = slot_logits(self.model, batch["image"], batch["input_ids"], batch["attention_mask"], batch["slots"])
        soft = soft_position_loss(logits, batch["bins"] + self.positions.start, self.positions, self.soft_targets,
                                  self.options.normalisation)
        return {"loss": self.options.soft_weight * soft, "soft": soft}

    def predict(self, batch: dict) -> list[dict]:
        logits = slot_logits(self.model, batch["image"], batch["input_ids"], batch["attention_mask"], batch["slots"])
        bins = logits[..., self.positions.start:self.positions.stop].argmax(dim=-1).cpu()
        height, width = batch["image"].shape[-2:]
        records: dict[int, dict] = {}
        for row, sample in enumerate(batch["sample"].tolist()):
            record = records.setdefault(sample, {"key": batch["__key__"][sample], "prompts": []})
            record["prompts"].append({
                "predicted": dequantise_box(bins[row].tolist(), width, height), "box": batch["box"][row].tolist(),
                "bins": bins[row].tolist(), "true_bins": batch["bins"][row].tolist(), "image_size": [width, height],
                "proposals": [list(map(float, box)) for box in batch["proposals"][row]]})
        return [records[sample] for sample in sorted(records)]


def mean_box_accuracy(boxes: torch.Tensor, sizes: torch.Tensor) -> float:
    """Acc@0.5 of predicting every box as the mean box of the split (centre and size relative to the image)."""
    scale = torch.cat([sizes, sizes], dim=1)
    mean = (xyxy_to_cxcywh(boxes) / scale).mean(dim=0)
    return accuracy_at_iou(cxcywh_to_xyxy(mean).expand_as(boxes) * scale, boxes)


def mean_bin_accuracy(true_bins: torch.Tensor, within: int) -> dict:
    """``exact`` and ``within_<within>`` of predicting every slot as the split's mean bin of that coordinate
    (x1, y1, x2, y2), rounded: the bins' counterpart of the mean-box ``chance``."""
    if true_bins.numel() == 0:
        return {"chance_exact": 0.0, f"chance_within_{within}": 0.0}
    mean = true_bins.double().mean(dim=0).round().long()
    return {"chance_exact": 100.0 * (true_bins == mean).double().mean().item(),
            f"chance_within_{within}": 100.0 * ((true_bins - mean).abs() <= within).double().mean().item()}


def evaluate(context) -> dict:
    prompts = [prompt for record in context.predictions() for prompt in record["prompts"]]
    predicted = torch.tensor([prompt["predicted"] for prompt in prompts])
    boxes = torch.tensor([prompt["box"] for prompt in prompts])
    bins, true_bins = torch.tensor([p["bins"] for p in prompts]), torch.tensor([p["true_bins"] for p in prompts])
    metrics = {"accuracy": accuracy_at_iou(predicted, boxes), "samples": len(prompts),
               "exact": 100.0 * (bins == true_bins).double().mean().item(),
               f"within_{context.options.within_bins}":
                   100.0 * ((bins - true_bins).abs() <= context.options.within_bins).double().mean().item(),
               "chance": mean_box_accuracy(boxes, torch.tensor([p["image_size"] for p in prompts], dtype=torch.float))}
    metrics.update(mean_bin_accuracy(true_bins, context.options.within_bins))
    if prompts and all(prompt["proposals"] for prompt in prompts):
        hits = [accuracy_at_iou(torch.tensor(p["proposals"]), torch.tensor(p["box"]).expand(len(p["proposals"]), 4))
                for p in prompts]
        metrics["chance_random_proposal"] = sum(hits) / len(hits)
    return metrics


def build_task(model, tokenizer, options: Options) -> nn.Module:
    return PromptGroundingTask(model, tokenizer, options)


SPEC = TaskSpec(name="prompt_grounding", options=Options, build=build_task,
                adapter=lambda tokenizer, options, train: PromptGroundingBatch(tokenizer, options, train),
                evaluate=evaluate, metric="accuracy")


def position_accuracy(argv: list[str]) -> int:
    """``position-accuracy RUN_DIR --summary FILE``: an evaluation run's ``exact`` and ``within_8`` as
    ``pretrain.position_accuracy`` of the summary (the demo evaluates the pretrained model this way)."""
    parser = argparse.ArgumentParser(prog="python -m finetune.prompt_grounding position-accuracy",
                                     description=position_accuracy.__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a prompt_grounding run folder (its results.json)")
    parser.add_argument("--summary", required=True, help="summary JSON to update")
    args = parser.parse_args(argv)
    with open(os.path.join(args.run_dir, "results.json")) as handle:
        results = json.load(handle)
    split = results.get("test") or results.get("val") or {}
    section = {}
    if os.path.exists(args.summary):
        with open(args.summary) as handle:
            section = json.load(handle).get("pretrain", {})
    section["position_accuracy"] = {"exact": split["exact"], "within_8": split["within_8"],
                                    "accuracy_at_0.5": split["accuracy"], "prompts": split["samples"],
                                    "chance_exact": split.get("chance_exact"),
                                    "chance_within_8": split.get("chance_within_8")}
    merge_into_summary(args.summary, "pretrain", section)
    print(f"position tokens of the pretrained model: exact bin {split['exact']:.1f}%, within 8 bins "
          f"{split['within_8']:.1f}%, Acc@0.5 {split['accuracy']:.1f}% ({split['samples']} boxes)")
    if split.get("chance_within_8") is not None:
        print(f"  each slot's mean bin instead: exact {split['chance_exact']:.1f}%, within 8 bins "
              f"{split['chance_within_8']:.1f}%")
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["position-accuracy"]:
        return position_accuracy(argv[1:])
    return run(SPEC, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
