"""Visual entailment fine-tuning (ALBEF ``VE.py``, SNLI-VE): does the image entail, contradict or leave open a sentence?

    python -m finetune.ve --config finetune/configs/ve_snli_ve.yaml --checkpoint runs/albef/checkpoints
    deepspeed --num_gpus 8 --module finetune.ve --config ... --checkpoint ... \
        --deepspeed_config ds_configs/zero2_bf16.json

Data: one sample per (image, hypothesis) with ``json.sentence`` and ``json.label`` in entailment / neutral /
contradiction (``data_shards build --format ve``). A horizontal flip swaps left/right in the sentence.

Model (reference/albef.md section 5): the sentence runs through the text layers and the fusion layers
cross-attending to the image; ``cls_head`` = Linear(hidden, hidden) -> ReLU -> Linear(hidden, 3) on the fused
[CLS], trained with cross-entropy. Labels are ALBEF's indices (contradiction 0, neutral 1, entailment 2). The
contrastive projections, the ITM head, the temperature and the MLM head are not used and not loaded.
Evaluation: accuracy on the split; ``chance`` is the better of guessing uniformly (33.3) and always answering
the split's most frequent label (``majority_class_rate``); ``accuracy_<label>`` is the accuracy on each label.

ALBEF also distils from a momentum copy of the model (alpha 0.4); this fine-tune uses plain cross-entropy.
``classifier_head``, ``classification_metrics`` and ``drop_unused_backbone_parts`` serve NLVR2 too.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from finetune.loop import DataError, EvalContext, TaskSpec, run
from pretrain.models.encoded import concept_inputs
from pretrain.text import pre_caption

# ALBEF's label indices (dataset/ve_dataset.py).
LABELS = {"contradiction": 0, "neutral": 1, "entailment": 2}
# Backbone parts a classifier on the fused [CLS] never uses: their checkpoint keys are skipped.
UNUSED_BACKBONE_KEYS = ("model.text_encoder.cls.*", "model.vision_proj.*", "model.text_proj.*", "model.itm_head.*",
                        "model.temp")


@dataclass(frozen=True)
class Options:
    max_words: int = 30            # sentence words kept by pre_caption (ALBEF: 30)


def classifier_head(hidden_size: int, classes: int) -> nn.Sequential:
    """ALBEF's ``cls_head``: Linear(hidden, hidden) -> ReLU -> Linear(hidden, classes)."""
    return nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.ReLU(), nn.Linear(hidden_size, classes))


def drop_unused_backbone_parts(model, keep_vision_projection: bool = False) -> None:
    """Remove the pretraining heads a classifier does not use, so they hold no parameters the optimizer would see."""
    model.text_encoder.cls = None
    model.text_proj = None
    model.itm_head = None
    model.temp = None
    if not keep_vision_projection:
        model.vision_proj = None


def classification_metrics(records: list[dict], class_names: list[str]) -> dict:
    """Accuracy of ``records`` ({"label", "prediction"} class indices) in percent, overall and per true class
    (``accuracy_<name>``), with the chance level: the better of a uniform guess and always predicting the most
    frequent label."""
    if not records:
        raise DataError("no prediction to score")
    correct = sum(record["prediction"] == record["label"] for record in records)
    counts = Counter(record["label"] for record in records)
    uniform, majority = 100.0 / len(class_names), 100.0 * counts.most_common(1)[0][1] / len(records)
    metrics = {"accuracy": 100.0 * correct / len(records), "chance": max(uniform, majority),
               "majority_class_rate": majority, "uniform_rate": uniform, "samples": len(records)}
    for index, name in enumerate(class_names):
        if counts[index]:
            hits = sum(record["prediction"] == index for record in records if record["label"] == index)
            metrics[f"accuracy_{name}"] = 100.0 * hits / counts[index]
    return metrics


class EntailmentBatch:
    """Loader-side adapter: the cleaned sentence, its tokens and the label index of every sample."""

    def __init__(self, tokenizer, max_words: int):
        self.tokenizer, self.max_words = tokenizer, max_words

    def __call__(self, batch: dict) -> dict:
        if batch["image"].dim() != 4:
            raise DataError(f"visual entailment takes one image per sample; batch of {batch['__key__'][0]!r} "
                            f"has images of shape {list(batch['image'].shape)}")
        texts, labels = [], []
        for key, text, meta in zip(batch["__key__"], batch["text"], batch["meta"], strict=True):
            label = meta.get("label")
            if label not in LABELS:
                raise DataError(f"visual entailment sample {key!r}: json.label {label!r} is not one of "
                                f"{', '.join(LABELS)} (build the shards with --format ve)")
            sentence = meta.get("sentence", text)
            if not isinstance(sentence, str) or not sentence.strip():
                raise DataError(f"visual entailment sample {key!r} has no sentence (json.sentence or txt)")
            texts.append(pre_caption(sentence, self.max_words))
            labels.append(LABELS[label])
        tokens = self.tokenizer(texts)
        return {**batch, "text": texts, "input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"],
                "label": torch.tensor(labels)}


class EntailmentTask(nn.Module):
    """forward(batch) -> {"loss"}; predict(batch) -> [{"key", "label", "prediction"}]. The backbone is ``model``."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        drop_unused_backbone_parts(model)
        self.cls_head = classifier_head(model.text_encoder.hidden_size, len(LABELS))

    def logits(self, batch: dict) -> torch.Tensor:
        model = self.model
        image_tokens = model.image_tokens(batch["image"].to(self.cls_head[0].weight.dtype), concept_inputs(batch))
        text_hidden = model.text_encoder.encode_text(batch["input_ids"], batch["attention_mask"])
        return self.cls_head(model.fused_cls(text_hidden, batch["attention_mask"], image_tokens))

    def forward(self, batch: dict) -> dict:
        return {"loss": F.cross_entropy(self.logits(batch).float(), batch["label"])}

    def predict(self, batch: dict) -> list[dict]:
        predictions = self.logits(batch).argmax(dim=1).tolist()
        return [{"key": key, "label": label, "prediction": prediction}
                for key, label, prediction in zip(batch["__key__"], batch["label"].tolist(), predictions, strict=True)]


def evaluate(context: EvalContext) -> dict:
    return classification_metrics(context.predictions(), list(LABELS))


SPEC = TaskSpec(name="ve", options=Options, build=lambda model, tokenizer, options: EntailmentTask(model),
                adapter=lambda tokenizer, options, train: EntailmentBatch(tokenizer, options.max_words),
                evaluate=evaluate, metric="accuracy", new_keys=("cls_head.*",), unused_keys=UNUSED_BACKBONE_KEYS)

if __name__ == "__main__":
    sys.exit(run(SPEC))
