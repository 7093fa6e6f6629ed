"""VCR by matching (PEVL): question, answer (and rationale) with object references as position tokens; the ITM head
scores each of the four choices.

    python -m finetune.vcr --config finetune/configs/vcr_vcr.yaml --checkpoint pevl_vcr_ssp.pth
    python -m finetune.vcr --config finetune/configs/vcr_synth.yaml --checkpoint runs/demo-pevl/pretrain/checkpoints

Data: ``data_shards build --format vcr`` (VCR records: ``question``, ``answer_choices``, ``rationale_choices`` as
token lists in which ``[i, ...]`` refers to objects, ``names``, ``bbox_list``, ``answer_label``,
``rationale_label``; ``data_shards.pevl_formats``).

Text (PEVL's ``pseudo_seq_gen``): an object reference is written ``name @@ p p p p ##`` (several objects joined by
"and"), and a choice is ``question [SEP] answer`` (Q->A) or ``question [SEP] right answer [SEP] rationale``
(QA->R). Training: each sample gives its four answers and, when it has rationales, its four rationales, the right
ones labelled 1 and the others 0, and the ITM head's cross-entropy over them (PEVL adds ITC on the same pairs; it
is left out here). Flips are off in the configs: the loader swaps left/right in ``json.question`` only, not in the
choices. The configs train on the whole image (``data.crop_mode: none``) so that every reference keeps its
position tokens; under a crop, an object cut off is written by its name alone. Evaluation: the choice with the
highest ITM "match" logit; ``accuracy`` is Q->A, with ``qa2r`` (QA->R, given the right answer) and ``q2ar``
(both right) beside it; ``chance`` 25 (``chance_q2ar`` 6.25).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from finetune.loop import DataError, TaskSpec, run
from finetune.prompting import assemble, backbone_with_positions, freeze
from pretrain.text.pevl_batch import referable_objects, reference_text
from pretrain.text.positions import with_position_tokens

CHOICES = 4


@dataclass(frozen=True)
class Options:
    rationales: bool = True       # also train and evaluate QA->R when the samples have rationale choices


class VCRBatch:
    """Loader-side adapter: four rows per question (answers), then four more per question with rationales;
    ``labels`` 1 for the right choice; ``group`` the (sample, kind) of each block of four."""

    def __init__(self, tokenizer, options: Options, train: bool):
        self.tokenizer = with_position_tokens(tokenizer)
        self.options, self.train = options, train

    def __call__(self, batch: dict) -> dict:
        height, width = batch["image"].shape[-2:]
        sep = (self.tokenizer.sep_token_id,)
        rows, labels, samples, kinds, truth = [], [], [], [], []
        for index, (key, meta) in enumerate(zip(batch["__key__"], batch["meta"], strict=True)):
            objects, cropped_out = referable_objects(meta)
            try:
                question = reference_text(meta["question"], objects, width, height, cropped_out=cropped_out)
                answers = [reference_text(choice, objects, width, height, cropped_out=cropped_out)
                           for choice in meta["answer_choices"]]
                blocks = [("q2a", [[question, sep, answer] for answer in answers], meta.get("answer_label"))]
                with_rationales = meta.get("rationale_choices") and meta.get("answer_label") is not None
                if self.options.rationales and with_rationales:
                    right = answers[meta["answer_label"]]
                    rationales = [reference_text(choice, objects, width, height, cropped_out=cropped_out)
                                  for choice in meta["rationale_choices"]]
                    blocks.append(("qa2r", [[question, sep, right, sep, rationale] for rationale in rationales],
                                   meta.get("rationale_label")))
            except (KeyError, TypeError, IndexError) as error:
                raise DataError(f"VCR sample {key!r}: {error} (build with --format vcr)") from None
            for kind, block, label in blocks:
                if len(block) != CHOICES:
                    raise DataError(f"VCR sample {key!r} has {len(block)} {kind} choices; VCR has {CHOICES}")
                if label is None and self.train:
                    raise DataError(f"VCR sample {key!r} has no {kind} label")
                rows += block
                labels += [int(choice == label) for choice in range(CHOICES)]
                samples.append(index)
                kinds.append(kind)
                truth.append(-1 if label is None else label)
        tokens, _ = assemble(self.tokenizer, rows)
        image_of_row = torch.tensor(samples).repeat_interleave(CHOICES)
        return {"__key__": batch["__key__"], "image": batch["image"][image_of_row], "input_ids": tokens["input_ids"],
                "attention_mask": tokens["attention_mask"], "labels": torch.tensor(labels),
                "block_sample": torch.tensor(samples), "block_kind": kinds, "block_label": torch.tensor(truth)}


class VCRTask(nn.Module):
    """forward(batch) -> {"loss", "itm"}; predict(batch) -> per question the chosen answer (and rationale)."""

    def __init__(self, model, tokenizer, options: Options):
        super().__init__()
        self.model, self.options = model, options
        self.__dict__["tokenizer"] = with_position_tokens(tokenizer)
        freeze(model.vision_proj, model.text_proj, model.temp)
        model.text_encoder.cls = None  # the MLM head is not used

    def backbone_to_task(self, state: dict) -> dict:
        state = {name: value for name, value in state.items() if not name.startswith("text_encoder.cls.")}
        return backbone_with_positions(state, self.tokenizer)

    def match_logits(self, batch: dict) -> torch.Tensor:
        image_tokens, _ = self.model.image_embeddings(batch["image"].to(self.model.vision_proj.weight.dtype))
        text_hidden = self.model.text_encoder.encode_text(batch["input_ids"], batch["attention_mask"])
        return self.model.itm_head(self.model.fused_cls(text_hidden, batch["attention_mask"], image_tokens)).float()

    def forward(self, batch: dict) -> dict:
        loss = F.cross_entropy(self.match_logits(batch), batch["labels"])
        return {"loss": loss, "itm": loss}

    def predict(self, batch: dict) -> list[dict]:
        scores = self.match_logits(batch)[:, 1].reshape(-1, CHOICES).cpu()
        records = {index: {"key": key} for index, key in enumerate(batch["__key__"])}
        for block, (sample, kind) in enumerate(zip(batch["block_sample"].tolist(), batch["block_kind"], strict=True)):
            records[sample][kind] = {"choice": int(scores[block].argmax()), "label": int(batch["block_label"][block])}
        return [records[index] for index in sorted(records)]


def evaluate(context) -> dict:
    predictions = context.predictions()
    right = {kind: [p[kind]["choice"] == p[kind]["label"] for p in predictions if kind in p]
             for kind in ("q2a", "qa2r")}
    metrics = {"accuracy": 100.0 * sum(right["q2a"]) / len(right["q2a"]), "samples": len(predictions), "chance": 25.0}
    if right["qa2r"] and len(right["qa2r"]) == len(right["q2a"]):
        metrics["qa2r"] = 100.0 * sum(right["qa2r"]) / len(right["qa2r"])
        metrics["q2ar"] = 100.0 * sum(a and r for a, r in zip(right["q2a"], right["qa2r"], strict=True)) / len(
            right["q2a"])
        metrics["chance_q2ar"] = 6.25
    return metrics


def build_task(model, tokenizer, options: Options) -> nn.Module:
    return VCRTask(model, tokenizer, options)


SPEC = TaskSpec(name="vcr", options=Options, build=build_task,
                adapter=lambda tokenizer, options, train: VCRBatch(tokenizer, options, train),
                evaluate=evaluate, metric="accuracy", unused_keys=("model.text_encoder.cls.*",))


if __name__ == "__main__":
    sys.exit(run(SPEC))
