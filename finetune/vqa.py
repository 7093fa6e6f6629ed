"""Visual question answering fine-tuning (ALBEF ``VQA.py``): an answer decoder ranking an answer list, or a classifier.

    python -m finetune.vqa --config finetune/configs/vqa_vqav2.yaml --checkpoint runs/albef/checkpoints
    deepspeed --num_gpus 8 --module finetune.vqa --config C --checkpoint P --deepspeed_config ds_configs/zero2_bf16.json

Data: shards built with ``data_shards build --format vqa`` (json: question_id, question, answers [{answer,
count}], dataset vqa|vg); ``options.answer_list`` is a JSON list of the candidate answers (ALBEF's
``answer_list.json``). Test splits may come without answers: their predictions only go to the results file.

``head: decoder`` (ALBEF): the question is fused with the image by the whole text encoder; an answer decoder
(BERT layers with causal self-attention and cross-attention to the fused question states) starts from the
encoder's fusion layers, embeddings and MLM head (reference/albef.md section 3). Its loss is each unique
answer's token-summed log-likelihood, weighted by the share of annotators who gave it (0.5 for Visual Genome),
summed over the batch and divided by the number of questions (no momentum distillation: fine-tuning starts
without ALBEF's momentum copies). Answers are ranked as ALBEF's ``rank_answer``:
the first-token probabilities pick the top ``k`` answers of the list, whose full likelihoods re-rank them.
``head: classifier``: an MLP on the fused [CLS] over the answer list, trained on the same weights as soft targets.

Evaluation: VQA accuracy in percent (``finetune.metrics.vqa``), ``chance`` = the expected accuracy of an answer
drawn uniformly from the list, and the EvalAI file ``vqa_<split>_results.json`` in ``options.results_dir``.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers.masking_utils import create_causal_mask

from finetune.loop import DataError, EvalContext, TaskSpec, run
from finetune.metrics import vqa as vqa_metrics
from finetune.ve import UNUSED_BACKBONE_KEYS, drop_unused_backbone_parts
from pretrain.config import ConfigError, resolve_path
from pretrain.models.encoded import concept_inputs
from pretrain.models.text import FusionBert
from pretrain.text import pre_caption
from pretrain.text.tokenizer import TextTokenizer

HEADS = ("decoder", "classifier")
RESULTS_FILE = "vqa_{split}_results.json"


@dataclass(frozen=True)
class Options:
    answer_list: str = ""              # JSON list of candidate answers (ALBEF answer_list.json)
    head: str = "decoder"              # decoder | classifier
    k: int = 128                       # answers re-ranked by their full likelihood (ALBEF k_test)
    first_token_twice: bool = True     # ALBEF's score: log p(first token) + log p(answer)
    max_answer_length: int = 16        # answer tokens, [CLS] and [SEP] included
    vg_weight: float = 0.5             # weight of a Visual Genome answer (ALBEF: 0.5)
    skip_unknown_answers: bool = False  # classifier: drop answers outside the list instead of failing
    results_dir: str = ""              # folder of the EvalAI results files (default: run.output_dir)

    def __post_init__(self):
        if self.head not in HEADS:
            raise ConfigError(f"options.head={self.head!r}: use one of {', '.join(HEADS)}")
        if not self.answer_list:
            raise ConfigError("options.answer_list is not set: give the JSON list of candidate answers")
        if self.k < 1:
            raise ConfigError(f"options.k={self.k} must be at least 1")


def read_answer_list(path: str) -> list[str]:
    """The candidate answers in ``path``: a JSON list of distinct strings."""
    resolved = resolve_path(path)
    try:
        with open(resolved) as handle:
            answers = json.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"options.answer_list={path!r} does not exist") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"options.answer_list={path!r} is not valid JSON: {error}") from None
    if not isinstance(answers, list) or not answers or not all(isinstance(answer, str) for answer in answers):
        raise ConfigError(f"options.answer_list={path!r} must hold a non-empty JSON list of strings")
    repeated = [answer for answer, count in Counter(answers).items() if count > 1]
    if repeated:
        raise ConfigError(f"options.answer_list={path!r} lists {repeated[0]!r} more than once")
    return answers


def answer_tokenizer(tokenizer: TextTokenizer, options: Options) -> TextTokenizer:
    """Answers as ALBEF's decoder reads them: ``[CLS] answer [SEP]``."""
    return TextTokenizer(tokenizer.tokenizer, max_length=options.max_answer_length, trailing_sep=True)


def answer_weights(meta: dict, vg_weight: float) -> dict[str, float]:
    """Unique answer -> weight: its share of the annotators (ALBEF), or ``vg_weight`` for Visual Genome."""
    answers = meta.get("answers") or []
    total = sum(answer["count"] for answer in answers)
    if meta.get("dataset") == "vg":
        return {answer["answer"]: vg_weight for answer in answers}
    return {answer["answer"]: answer["count"] / total for answer in answers}


def human_answers(meta: dict) -> list[str]:
    """The annotators' answers, one entry per annotator."""
    return [answer["answer"] for answer in meta.get("answers") or [] for _ in range(answer["count"])]


class VQABatch:
    """Loader-side adapter: cleaned, tokenised questions; in training the answers and their weights, as
    flat tokenised answers with a count per question (decoder) or soft targets over the list (classifier)."""

    def __init__(self, tokenizer: TextTokenizer, options: Options, train: bool):
        self.tokenizer, self.options, self.train = tokenizer, options, train
        self.answers = answer_tokenizer(tokenizer, options)
        self.index = ({answer: position for position, answer in enumerate(read_answer_list(options.answer_list))}
                      if train and options.head == "classifier" else None)

    def __call__(self, batch: dict) -> dict:
        questions, weights = [], []
        for key, text, meta in zip(batch["__key__"], batch["text"], batch["meta"], strict=True):
            if "question_id" not in meta:
                raise DataError(f"VQA sample {key!r} has no json.question_id (build the shards with --format vqa)")
            questions.append(pre_caption(text, 30 if self.train else 50))
            if self.train:
                weights.append(self._training_answers(key, meta))
        tokens = self.tokenizer(questions)
        out = {**batch, "text": questions, "input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}
        if not self.train:
            return out
        if self.index is not None:
            targets = torch.zeros(len(weights), len(self.index))
            for row, answers in enumerate(weights):
                for answer, weight in answers.items():
                    targets[row, self.index[answer]] = weight
            return {**out, "answer_targets": targets}
        flat = [answer for answers in weights for answer in answers]
        answer_tokens = self.answers(flat)
        return {**out, "answer_ids": answer_tokens["input_ids"], "answer_mask": answer_tokens["attention_mask"],
                "answer_weights": torch.tensor([weight for answers in weights for weight in answers.values()]),
                "answer_counts": torch.tensor([len(answers) for answers in weights])}

    def _training_answers(self, key: str, meta: dict) -> dict[str, float]:
        name = f"question_id {meta['question_id']!r} (sample {key!r})"
        weights = answer_weights(meta, self.options.vg_weight)
        if not weights:
            raise DataError(f"{name} has no answer; every question of a training split needs its answers")
        if self.index is not None:
            unknown = [answer for answer in weights if answer not in self.index]
            if unknown and not self.options.skip_unknown_answers:
                raise DataError(f"{name} has the answer {unknown[0]!r}, which is not in options.answer_list; the "
                                f"classifier head only learns listed answers (options.skip_unknown_answers: true "
                                f"drops such answers)")
            weights = {answer: weight for answer, weight in weights.items() if answer in self.index}
            if not weights:
                raise DataError(f"{name} has no answer in options.answer_list")
        return weights


class AnswerDecoder(FusionBert):
    """ALBEF's answer decoder: every layer runs causal self-attention over the answer tokens, then
    cross-attention to the fused question states (width = the text hidden size), then the feed-forward;
    ``mlm_logits`` is the next-token head. Built with the encoder's config and ``num_layers`` layers."""

    def __init__(self, config, num_layers: int):
        config = copy.deepcopy(config)
        config.num_hidden_layers = num_layers
        super().__init__(config, fusion_layer=0, encoder_width=config.hidden_size, with_mlm_head=True)
        for layer in self.bert.encoder.layer:
            layer.attention.self.is_causal = True

    def _self_attention_mask(self, hidden: torch.Tensor, attention_mask: torch.Tensor):
        return create_causal_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask,
                                  past_key_values=None, allow_is_causal_skip=False)

    def answer_nll(self, answer_ids, answer_mask, question_states, question_mask) -> torch.Tensor:
        """Negative log-likelihood of each answer, summed over its tokens after [CLS]: ``[A]``."""
        hidden = self(answer_ids, answer_mask, question_states, question_mask)
        logits = self.mlm_logits(hidden[:, :-1]).float()
        targets = answer_ids[:, 1:].masked_fill(answer_mask[:, 1:] == 0, -100)
        return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none", ignore_index=-100).sum(1)


def decoder_key(key: str, fusion_layer: int) -> str | None:
    """ALBEF's VQA key map: ``text_encoder`` layer ``n >= fusion_layer`` -> ``text_decoder`` layer
    ``n - fusion_layer``; embeddings and the MLM head are copied; text-only layers have no place."""
    if not key.startswith("text_encoder."):
        return None
    parts = key.split(".")
    if parts[1:4] == ["bert", "encoder", "layer"]:
        index = int(parts[4])
        if index < fusion_layer:
            return None
        parts[4] = str(index - fusion_layer)
    return ".".join(["text_decoder", *parts[1:]])


class VQATask(nn.Module):
    """forward(batch) -> {"loss", "answer_loss"}; predict(batch) -> [{question_id, answer, answers}]."""

    def __init__(self, model, answer_list: list[str], answer_tokens: dict, options: Options,
                 decoder: AnswerDecoder | None = None):
        super().__init__()
        self.model = model
        self.options = options
        self.answer_list = list(answer_list)
        # The encoder's MLM head lives on in the decoder only; the contrastive and ITM heads are not used (ALBEF's
        # VQA model has none).
        drop_unused_backbone_parts(model)
        hidden = model.text_encoder.hidden_size
        if options.head == "decoder":
            self.text_decoder = decoder
        else:
            self.classifier = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.LayerNorm(2 * hidden), nn.GELU(),
                                            nn.Linear(2 * hidden, len(answer_list)))
        self.register_buffer("answer_ids", answer_tokens["input_ids"], persistent=False)
        self.register_buffer("answer_mask", answer_tokens["attention_mask"], persistent=False)

    def backbone_to_task(self, state: dict) -> dict:
        """Backbone weights under ``model.``; for the decoder head also the decoder's copy of the fusion layers.
        Decoder cross-attention keys/values whose width differs (vision width != text width) start fresh.
        A state that has its own ``text_decoder.*`` (ALBEF's released ``vqa.pth``) keeps that decoder; its
        momentum copy ``text_decoder_m.*`` is dropped."""
        decoder = {name: value for name, value in state.items() if name.startswith("text_decoder.")}
        mapped = {f"model.{name}": value for name, value in state.items()
                  if not name.startswith(("text_decoder.", "text_decoder_m."))}
        if self.options.head != "decoder":
            return mapped
        if decoder:
            return {**mapped, **decoder}
        own = self.state_dict()
        for name, value in state.items():
            target = decoder_key(name, self.model.text_encoder.fusion_layer)
            if target not in own:
                continue
            # A layer is copied whole or not at all: its bias fits even where its weight does not.
            source_weight = state.get(name.rsplit(".", 1)[0] + ".weight", value)
            target_weight = own.get(target.rsplit(".", 1)[0] + ".weight", own[target])
            if source_weight.shape == target_weight.shape:
                mapped[target] = value
        return mapped

    def question_states(self, batch: dict) -> torch.Tensor:
        model = self.model
        images = batch["image"].to(next(model.visual_encoder.parameters()).dtype)
        image_tokens = model.image_tokens(images, concept_inputs(batch))
        return model.text_encoder(batch["input_ids"], batch["attention_mask"], image_tokens)

    def forward(self, batch: dict) -> dict:
        states, mask = self.question_states(batch), batch["attention_mask"]
        if self.options.head == "classifier":
            log_probs = F.log_softmax(self.classifier(states[:, 0]).float(), dim=1)
            loss = -(batch["answer_targets"] * log_probs).sum(1).mean()
        else:
            counts = batch["answer_counts"]
            nll = self.text_decoder.answer_nll(batch["answer_ids"], batch["answer_mask"],
                                               states.repeat_interleave(counts, 0), mask.repeat_interleave(counts, 0))
            loss = (batch["answer_weights"] * nll).sum() / states.shape[0]
        return {"loss": loss, "answer_loss": loss.detach()}

    @torch.no_grad()
    def rank_answers(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ALBEF's ``rank_answer``: index into the answer list of each question's best answer ``[B]``."""
        batch_size, decoder = states.shape[0], self.text_decoder
        start = self.answer_ids[:1, :1].expand(batch_size, 1)  # [CLS]
        first = decoder.mlm_logits(decoder(start, torch.ones_like(start), states, mask)[:, 0]).float()
        first_probs = first.softmax(dim=1)[:, self.answer_ids[:, 1]]
        k = min(self.options.k, len(self.answer_list))
        top_probs, top_index = first_probs.topk(k, dim=1)
        answer_ids, answer_mask = self.answer_ids[top_index].flatten(0, 1), self.answer_mask[top_index].flatten(0, 1)
        scores = -decoder.answer_nll(answer_ids, answer_mask, states.repeat_interleave(k, 0),
                                     mask.repeat_interleave(k, 0)).view(batch_size, k)
        if self.options.first_token_twice:
            scores = scores + top_probs.log()
        return top_index.gather(1, scores.argmax(dim=1, keepdim=True)).squeeze(1)

    @torch.no_grad()
    def predict(self, batch: dict) -> list[dict]:
        states = self.question_states(batch)
        if self.options.head == "classifier":
            best = self.classifier(states[:, 0]).argmax(dim=1)
        else:
            best = self.rank_answers(states, batch["attention_mask"])
        return [{"question_id": meta["question_id"], "answer": self.answer_list[index], "answers": human_answers(meta)}
                for meta, index in zip(batch["meta"], best.tolist(), strict=True)]


def chance_accuracy(answer_list: list[str], records: list[dict]) -> float:
    """Expected VQA accuracy (percent) of an answer drawn uniformly from ``answer_list`` for every record."""
    listed = Counter(vqa_metrics.normalize_answer(answer) for answer in answer_list)
    total = 0.0
    for record in records:
        humans = Counter(vqa_metrics.normalize_answer(answer) for answer in record["answer"])
        total += sum(copies * min(humans[answer] / 3, 1.0) for answer, copies in listed.items() if answer in humans)
    return 100.0 * total / (len(records) * len(answer_list))


def evaluate(context: EvalContext) -> dict:
    """Predictions for the whole split, the EvalAI results file, and accuracy when the split has answers."""
    options = context.options
    predictions = context.predictions()
    unanswered = [prediction["question_id"] for prediction in predictions if not prediction["answers"]]
    if unanswered and len(unanswered) != len(predictions):
        raise DataError(f"{context.split} split: question_id {unanswered[0]!r} has no answers while others have; "
                        f"a split is scored only when every question has its answers")
    if unanswered and context.split == "val":
        raise DataError(f"val split {context.urls!r} has no answers (e.g. question_id {unanswered[0]!r}); the "
                        f"best checkpoint is chosen by val accuracy")
    folder = resolve_path(options.results_dir) if options.results_dir else context.output_dir
    path = os.path.join(folder, RESULTS_FILE.format(split=context.split))
    results = [(p["question_id"], p["answer"]) for p in predictions]
    try:  # checked on every rank (each holds all predictions), so a bad id stops them all, not rank 0 alone
        vqa_metrics.evalai_entries(results)
    except ValueError as error:
        raise DataError(f"{context.split} split: {error}") from None
    if not dist.is_initialized() or dist.get_rank() == 0:
        vqa_metrics.write_evalai_results(path, results)
    metrics: dict = {"questions": len(predictions), "results_file": path}
    if not unanswered:
        records = [{"question_id": p["question_id"], "answer": p["answers"]} for p in predictions]
        try:
            metrics["vqa_accuracy"] = vqa_metrics.evaluate({p["question_id"]: p["answer"] for p in predictions},
                                                           records)
        except ValueError as error:
            raise DataError(f"{context.split} split: {error}") from None
        metrics["chance"] = chance_accuracy(context.module.answer_list, records)
    return metrics


def build_task(model, tokenizer: TextTokenizer, options: Options) -> VQATask:
    answer_list = read_answer_list(options.answer_list)
    decoder = None
    if options.head == "decoder":
        text = model.text_encoder
        layers = text.config.num_hidden_layers - text.fusion_layer
        if layers < 1:
            raise ConfigError(f"model.fusion_layer={text.fusion_layer} leaves no fusion layer to start the answer "
                              f"decoder from")
        decoder = AnswerDecoder(text.config, layers)
        decoder.set_grad_checkpointing(text.grad_checkpointing)
    return VQATask(model, answer_list, answer_tokenizer(tokenizer, options)(answer_list), options, decoder)


SPEC = TaskSpec(name="vqa", options=Options, build=build_task,
                adapter=lambda tokenizer, options, train: VQABatch(tokenizer, options, train), evaluate=evaluate,
                metric="vqa_accuracy", transform={"flip_text": "skip"},
                new_keys=("classifier.*", "text_decoder.bert.encoder.layer.*.crossattention.self.key.*",
                          "text_decoder.bert.encoder.layer.*.crossattention.self.value.*"),
                unused_keys=UNUSED_BACKBONE_KEYS)

if __name__ == "__main__":
    sys.exit(run(SPEC))
