"""NLVR2 fine-tuning (ALBEF ``NLVR.py``): is a sentence true of a pair of images? With ALBEF's text-assignment pre-step.

    python -m finetune.nlvr2 --config finetune/configs/nlvr2_nlvr2.yaml --checkpoint runs/albef/checkpoints
    deepspeed --num_gpus 8 --module finetune.nlvr2 --config ... --checkpoint ... \
        --deepspeed_config ds_configs/zero2_bf16.json

Data: one sample per (image pair, sentence) with ``json.sentence`` and ``json.label`` true/false (``data_shards build
--format nlvr2``); batches hold images ``[B, 2, 3, H, W]``. "left"/"right" name the images of the pair, so flips
leave the sentence alone.

Model (reference/albef.md sections 3 and 5): every fusion layer is doubled into two consecutive blocks
(``ImagePairFusionLayer``), the first cross-attending to image 0 and the second to image 1 of the pair, each with its
own self-attention and feed-forward; the two blocks share the cross-attention key and value projections. A
pretraining checkpoint's fusion layer L (from ``fusion_layer`` f on) initialises both blocks, layers 2(L - f) + f and
2(L - f) + f + 1 (``duplicate_fusion_layers``), so a 6 + 6 layer encoder becomes 6 + 12 layers. ``cls_head`` =
Linear(hidden, hidden) -> ReLU -> Linear(hidden, 2) on the fused [CLS] (``options.head: mlp``: X-VLM's Linear(hidden,
2 hidden) -> LayerNorm -> GELU -> Linear), cross-entropy; label 1 = true. Evaluation:
accuracy; ``chance`` is the better of 50 and always answering the split's most frequent label.

Text assignment (``options.text_assignment: true``, ALBEF ``Pretrain_nlvr.py``): before fine-tuning, a phase on
image-caption shards (``options.text_assignment_train``, ALBEF uses its pretraining data) teaches the doubled encoder
which image of a pair a caption describes. For caption b, with probability 2/3 its own image goes to slot 0 (label 0)
or slot 1 (label 1) beside an image of the batch drawn by ITC similarity, else two drawn images fill both slots
(label 2, neither); ``ta_head`` = Linear(hidden, 3). The phase runs as its own fine-tuning run (one epoch or
``text_assignment_steps``, its own schedule) under ``OUTPUT/text_assignment``, scored on
``options.text_assignment_val``; fine-tuning then starts from its checkpoint. Unlike ALBEF, the phase keeps the
fine-tuning image size (ALBEF: 256 px, then 384 px). ALBEF also distils from momentum copies; this is plain
cross-entropy.
"""

from __future__ import annotations

import json
import os
import sys
import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from finetune.loop import DataError, EvalContext, TaskSpec, parse_args, run
from finetune.schema import FinetuneConfig
from finetune.ve import UNUSED_BACKBONE_KEYS, classification_metrics, classifier_head, drop_unused_backbone_parts
from pretrain.checkpoint import atomic_write_text
from pretrain.config import ConfigError, from_mapping, load_config
from pretrain.models.albef import build_itm_head
from pretrain.models.encoded import concept_inputs
from pretrain.models.text import FusionBertLayer
from pretrain.runtime import is_first_rank
from pretrain.text import pre_caption

LAYER_PREFIX = "text_encoder.bert.encoder.layer."
ASSIGNMENT_TEMPERATURE = 0.07  # ALBEF's fixed temperature for drawing the partner images


@dataclass(frozen=True)
class Options:
    max_words: int = 30                          # sentence words kept by pre_caption (ALBEF: 30)
    text_assignment: bool = False                # run the text-assignment phase before fine-tuning
    text_assignment_train: str | None = None     # image-caption shards of the phase (one sample per image)
    text_assignment_val: str | None = None       # image-caption shards the phase is scored on
    text_assignment_samples: int | None = None   # samples per epoch of the phase (default: the shards' sizes.json)
    text_assignment_steps: int | None = None     # stop the phase after N steps (default: one epoch)
    text_assignment_lr: float | None = None      # default: optim.lr
    # cls_head: albef (Linear -> ReLU -> Linear) | mlp (X-VLM: Linear(H, 2H) -> LayerNorm -> GELU -> Linear)
    head: str = "albef"

    def __post_init__(self):
        if self.head not in ("albef", "mlp"):
            raise ConfigError(f"options.head={self.head!r}: use albef (ALBEF's classifier) or mlp (X-VLM's)")


class ImagePairFusionLayer(FusionBertLayer):
    """A fusion block of the NLVR2 encoder: it reads image ``image_index`` of the pair ``[B, 2, N, D]`` it is given."""

    def __init__(self, config, encoder_width: int, image_index: int, layer_idx: int | None = None):
        super().__init__(config, encoder_width, layer_idx=layer_idx)
        self.image_index = image_index

    def share_image_projections(self, other: FusionBertLayer) -> None:
        """Use ``other``'s cross-attention key and value projections (ALBEF ties them within a pair of blocks)."""
        self.crossattention.self.key = other.crossattention.self.key
        self.crossattention.self.value = other.crossattention.self.value

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                **kwargs):
        if encoder_hidden_states is None or encoder_hidden_states.dim() != 4:
            raise ValueError("an image-pair fusion layer needs the pair's image tokens as one [B, 2, N, D] tensor")
        return super().forward(hidden_states, attention_mask, encoder_hidden_states[:, self.image_index],
                               encoder_attention_mask, **kwargs)


def double_fusion_layers(text_encoder) -> None:
    """Replace every fusion layer of a ``FusionBert`` by two ``ImagePairFusionLayer`` blocks (images 0 and 1)."""
    fusion_layer, config = text_encoder.fusion_layer, text_encoder.config
    layers = list(text_encoder.bert.encoder.layer[:fusion_layer])
    for index in range(fusion_layer, len(text_encoder.bert.encoder.layer)):
        first_index = 2 * (index - fusion_layer) + fusion_layer
        first = ImagePairFusionLayer(config, text_encoder.encoder_width, 0, layer_idx=first_index)
        second = ImagePairFusionLayer(config, text_encoder.encoder_width, 1, layer_idx=first_index + 1)
        second.share_image_projections(first)
        layers += [first, second]
    text_encoder.bert.encoder.layer = nn.ModuleList(layers)
    config.num_hidden_layers = len(layers)


def duplicate_fusion_layers(state: dict, fusion_layer: int) -> dict:
    """ALBEF's key map for the doubled encoder: text layers stay, fusion layer L fills layers 2(L - f) + f and
    2(L - f) + f + 1 (f = ``fusion_layer``); keys outside the text layers are unchanged."""
    mapped = {}
    for key, value in state.items():
        if key.startswith(LAYER_PREFIX):
            index, rest = key[len(LAYER_PREFIX):].split(".", 1)
            if int(index) >= fusion_layer:
                first = 2 * (int(index) - fusion_layer) + fusion_layer
                mapped[f"{LAYER_PREFIX}{first}.{rest}"] = value
                mapped[f"{LAYER_PREFIX}{first + 1}.{rest}"] = value
                continue
        mapped[key] = value
    return mapped


def assignment_examples(image_features: torch.Tensor, generator: torch.Generator | None = None):
    """Text-assignment examples for a batch of (image, caption) pairs: ``(slot 0 images, slot 1 images, labels)``
    as index tensors into the batch. Partners are drawn from softmax(similarity / 0.07) without the caption's
    own image. A batch of 2 has no two partners to draw, so it gives labels 0 and 1 only."""
    size = image_features.shape[0]
    if size < 2:
        raise ValueError("text assignment needs at least 2 images in a batch")
    features = image_features.detach().float().cpu()
    weights = F.softmax(features @ features.T / ASSIGNMENT_TEMPERATURE, dim=1)
    weights.fill_diagonal_(0)
    draws = torch.rand(size, 2, generator=generator)
    first, second, labels = [], [], []
    for own in range(size):
        if draws[own, 0] > 1 / 3 or size < 3:
            other = int(torch.multinomial(weights[own], 1, generator=generator))
            slots, label = ((own, other), 0) if draws[own, 1] > 0.5 else ((other, own), 1)
        else:
            slots, label = tuple(torch.multinomial(weights[own], 2, generator=generator).tolist()), 2
        first.append(slots[0])
        second.append(slots[1])
        labels.append(label)
    return torch.tensor(first), torch.tensor(second), torch.tensor(labels)


def _sentence(key: str, text: str, meta: dict, what: str, max_words: int) -> str:
    sentence = meta.get("sentence", text)
    if not isinstance(sentence, str) or not sentence.strip():
        raise DataError(f"{what} sample {key!r} has no text (json.sentence or txt)")
    return pre_caption(sentence, max_words)


class PairBatch:
    """Loader-side adapter for NLVR2: the cleaned sentence, its tokens and the label (1 = true) of every sample."""

    def __init__(self, tokenizer, max_words: int):
        self.tokenizer, self.max_words = tokenizer, max_words

    def __call__(self, batch: dict) -> dict:
        if batch["image"].dim() != 5:
            raise DataError(f"NLVR2 takes two images per sample (build the shards with --format nlvr2); the batch of "
                            f"{batch['__key__'][0]!r} has images of shape {list(batch['image'].shape)}")
        texts, labels = [], []
        for key, text, meta in zip(batch["__key__"], batch["text"], batch["meta"], strict=True):
            if not isinstance(meta.get("label"), bool):
                raise DataError(f"NLVR2 sample {key!r}: json.label {meta.get('label')!r} is not true/false "
                                f"(build the shards with --format nlvr2)")
            texts.append(_sentence(key, text, meta, "NLVR2", self.max_words))
            labels.append(int(meta["label"]))
        tokens = self.tokenizer(texts)
        return {**batch, "text": texts, "input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"],
                "label": torch.tensor(labels)}


class CaptionBatch:
    """Loader-side adapter for the text-assignment phase: one caption per image (a random one of ``captions`` in
    training, the first in evaluation) and its tokens."""

    def __init__(self, tokenizer, max_words: int, train: bool):
        self.tokenizer, self.max_words, self.train = tokenizer, max_words, train
        self.calls = 0

    def __call__(self, batch: dict) -> dict:
        if batch["image"].dim() != 4:
            raise DataError(f"text assignment takes image-caption shards with one image per sample; the batch of "
                            f"{batch['__key__'][0]!r} has images of shape {list(batch['image'].shape)}")
        texts = []
        for key, text, meta in zip(batch["__key__"], batch["text"], batch["meta"], strict=True):
            captions = [caption for caption in meta.get("captions") or [text] if isinstance(caption, str)]
            if not captions or not captions[0].strip():
                raise DataError(f"text-assignment sample {key!r} has no caption (json.captions or txt)")
            choice = zlib.crc32(f"{key}:{self.calls}".encode()) % len(captions) if self.train else 0
            texts.append(pre_caption(captions[choice], self.max_words))
        self.calls += 1
        tokens = self.tokenizer(texts)
        return {**batch, "text": texts, "input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}


class PairTask(nn.Module):
    """forward(batch) -> {"loss"}: NLVR2 cross-entropy on image pairs, or text assignment on single images;
    predict(batch) -> [{"key", "label", "prediction"}]. The backbone is ``model`` with its fusion layers doubled."""

    def __init__(self, model, options: Options):
        super().__init__()
        self.model = model
        self.options = options
        drop_unused_backbone_parts(model, keep_vision_projection=options.text_assignment)
        if options.text_assignment:
            model.vision_proj.requires_grad_(False)  # only draws partner images, without gradient (as ALBEF)
        self.fusion_layer = model.text_encoder.fusion_layer
        double_fusion_layers(model.text_encoder)
        hidden = model.text_encoder.hidden_size
        # X-VLM's two-class head has the shape of its (and our mlp) ITM head.
        self.cls_head = classifier_head(hidden, 2) if options.head == "albef" else build_itm_head("mlp", hidden)
        self.ta_head = nn.Linear(hidden, 3) if options.text_assignment else None

    def backbone_to_task(self, state: dict) -> dict:
        """A pretraining state gets its fusion layers doubled; a state that already has the doubled encoder
        (ALBEF's released ``pretrain_model_nlvr.pth``) loads as it is, its ``ta_head`` into this task's."""
        total = len(self.model.text_encoder.bert.encoder.layer)  # fusion_layer + 2 x the pretrained fusion layers
        indices = [int(key[len(LAYER_PREFIX):].split(".", 1)[0]) for key in state if key.startswith(LAYER_PREFIX)]
        if not indices or max(indices) < (total + self.fusion_layer) // 2:
            state = duplicate_fusion_layers(state, self.fusion_layer)
        # A fine-tuned file's own heads (X-VLM's NLVR2 checkpoints hold cls_head) are the task's.
        return {key if key.startswith(("ta_head.", "cls_head.")) else f"model.{key}": value
                for key, value in state.items()}

    def _fused_cls(self, pair_tokens: torch.Tensor, batch: dict) -> torch.Tensor:
        text = self.model.text_encoder
        hidden = text.encode_text(batch["input_ids"], batch["attention_mask"])
        return text.fuse(hidden, batch["attention_mask"], pair_tokens)[:, 0]

    def logits(self, batch: dict) -> torch.Tensor:
        images = batch["image"]
        tokens = self.model.image_tokens(images.flatten(0, 1).to(self.cls_head[0].weight.dtype), concept_inputs(batch))
        return self.cls_head(self._fused_cls(tokens.unflatten(0, images.shape[:2]), batch))

    def assignment_logits(self, batch: dict, generator: torch.Generator | None = None):
        if self.ta_head is None:
            raise ValueError("single-image batches are for the text-assignment phase; set options.text_assignment")
        model = self.model
        tokens = model.image_tokens(batch["image"].to(self.ta_head.weight.dtype), concept_inputs(batch))
        with torch.no_grad():
            features = F.normalize(model.vision_proj(tokens[:, 0]).float(), dim=-1)
        first, second, labels = assignment_examples(features, generator)
        pair = torch.stack([tokens[first.to(tokens.device)], tokens[second.to(tokens.device)]], dim=1)
        return self.ta_head(self._fused_cls(pair, batch)), labels.to(tokens.device)

    def forward(self, batch: dict) -> dict:
        if batch["image"].dim() == 4:
            logits, labels = self.assignment_logits(batch)
        else:
            logits, labels = self.logits(batch), batch["label"]
        return {"loss": F.cross_entropy(logits.float(), labels)}

    def predict(self, batch: dict) -> list[dict]:
        keys = batch["__key__"]
        if batch["image"].dim() == 5:
            labels, predictions = batch["label"].tolist(), self.logits(batch).argmax(dim=1).tolist()
        elif len(keys) < 2:  # a last batch of one image has no partner: it is not scored, but it still runs a
            # forward (the image as its own partner) so that every rank makes the same collective calls (ZeRO-3
            # gathers parameters in each forward, and another rank may be repeating a full batch meanwhile)
            self.assignment_logits({name: torch.cat([batch[name]] * 2) for name in
                                    ("image", "input_ids", "attention_mask", "concept_ids", "concept_mask")
                                    if name in batch}, torch.Generator().manual_seed(0))
            labels = predictions = [None]
        else:
            generator = torch.Generator().manual_seed(zlib.crc32("\n".join(keys).encode()))
            logits, labels = self.assignment_logits(batch, generator)
            labels, predictions = labels.tolist(), logits.argmax(dim=1).tolist()
        return [{"key": key, "label": label, "prediction": prediction}
                for key, label, prediction in zip(keys, labels, predictions, strict=True)]


def evaluate(context: EvalContext) -> dict:
    return classification_metrics(context.predictions(), ["false", "true"])


def evaluate_assignment(context: EvalContext) -> dict:
    scored = [record for record in context.predictions() if record["label"] is not None]
    if not scored:
        raise DataError(f"{context.split} split {context.urls!r}: no batch of at least 2 images to score")
    return classification_metrics(scored, ["image_0", "image_1", "neither"])


def _build(model, tokenizer, options: Options) -> PairTask:
    return PairTask(model, options)


SPEC = TaskSpec(name="nlvr2", options=Options, build=_build,
                adapter=lambda tokenizer, options, train: PairBatch(tokenizer, options.max_words),
                evaluate=evaluate, metric="accuracy", new_keys=("cls_head.*", "ta_head.*"),
                unused_keys=(*UNUSED_BACKBONE_KEYS, "ta_head.*"))
TEXT_ASSIGNMENT_SPEC = TaskSpec(
    name="nlvr2", options=Options, build=_build,
    adapter=lambda tokenizer, options, train: CaptionBatch(tokenizer, options.max_words, train),
    evaluate=evaluate_assignment, metric="accuracy", new_keys=SPEC.new_keys, unused_keys=SPEC.unused_keys)


def _arguments(args, checkpoint: str, output_dir: str | None, max_steps: int | None, overrides=()) -> list[str]:
    argv = ["--config", args.config, "--checkpoint", checkpoint, "--deepspeed_config", args.deepspeed_config,
            "--local_rank", str(args.local_rank)]
    argv += ["--output-dir", output_dir] if output_dir else []
    argv += ["--max-steps", str(max_steps)] if max_steps is not None else []
    for override in [*args.overrides, *overrides]:
        argv += ["--set", override]
    return argv


def main(argv: list[str] | None = None) -> int:
    """Text assignment first when the options ask for it (and this is not ``--evaluate``), then fine-tuning."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args("nlvr2", argv)
    try:
        config = load_config(FinetuneConfig, args.config, args.overrides)
        options = from_mapping(Options, config.options, "options")
        if options.text_assignment and not (options.text_assignment_train and options.text_assignment_val):
            raise ConfigError("options.text_assignment needs options.text_assignment_train and text_assignment_val "
                              "(image-caption shards, e.g. the pretraining data and a retrieval val split)")
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.evaluate or not options.text_assignment:
        return run(SPEC, argv)
    output_dir = args.output_dir or config.run.output_dir
    phase_dir = os.path.join(output_dir, "text_assignment")
    phase = {"data.train": options.text_assignment_train, "data.val": options.text_assignment_val,
             "data.test": None, "data.train_samples": options.text_assignment_samples, "optim.epochs": 1,
             "optim.lr": options.text_assignment_lr or config.optim.lr, "run.eval_every_epoch": False}
    overrides = [f"{key}={json.dumps(value)}" for key, value in phase.items()]
    _announce(f"text-assignment phase on {options.text_assignment_train} -> {phase_dir}")
    code = run(TEXT_ASSIGNMENT_SPEC, _arguments(args, args.checkpoint, phase_dir, options.text_assignment_steps,
                                                overrides))
    if code != 0:
        return code
    _announce(f"NLVR2 fine-tuning from the text-assignment checkpoint -> {output_dir}")
    code = run(SPEC, _arguments(args, os.path.join(phase_dir, "checkpoints"), output_dir, args.max_steps))
    if code == 0 and dist.get_rank() == 0:
        _record_phase(output_dir, phase_dir, args.checkpoint)
    return code


def _announce(message: str) -> None:
    if is_first_rank():
        print(f"[finetune.nlvr2] {message}", file=sys.stderr)


def _record_phase(output_dir: str, phase_dir: str, pretrained: str) -> None:
    """Name the pretraining checkpoint and the text-assignment results in the fine-tuning results."""
    path = os.path.join(output_dir, "results.json")
    with open(path) as handle:
        results = json.load(handle)
    with open(os.path.join(phase_dir, "results.json")) as handle:
        phase = json.load(handle)
    results["text_assignment"] = {"checkpoint": pretrained, "output_dir": phase_dir, "steps": phase.get("steps"),
                                  "val": phase.get("val"), "seconds": phase.get("seconds")}
    atomic_write_text(path, json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    sys.exit(main())
