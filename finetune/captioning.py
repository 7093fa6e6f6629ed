"""Image captioning fine-tuning (X-VLM ``coco_captioning``): the text encoder as a causal decoder, LM loss, beam search.

    python -m finetune.captioning --config finetune/configs/captioning_coco.yaml --checkpoint runs/albef/checkpoints
    deepspeed --num_gpus 8 --module finetune.captioning --config ... --checkpoint ... \
        --deepspeed_config ds_configs/zero2_bf16.json
    python -m finetune.captioning --config ... --checkpoint runs/caption/checkpoints --set options.scst=true

Data: ``data_shards build --format caption`` (Karpathy records: one caption each, or a ``caption`` list per image;
``json.captions``, ``json.image_id``). A training sample uses one of its captions at random; evaluation groups the
captions of each ``image_id`` as its references.

Decoder: the pretrained text encoder itself run left to right (:class:`CaptionDecoder`; our reading of X-VLM's
captioner, as the references do not spell out its key map): every self-attention causal, the fusion layers'
cross-attention reading the image tokens, the MLM head (tied to the word embeddings) as the LM head. Parameter
names stay ALBEF's, so the backbone key map is the identity (``text_encoder.bert.encoder.layer.N.*`` -> decoder
layer N, cross-attention included; ``text_encoder.cls.*`` -> LM head); the contrastive projections, the ITM head
and ``temp`` are dropped. A caption is ``[CLS] prompt caption [SEP]``; the loss is the next-token cross-entropy
(label smoothing optional) on the caption and ``[SEP]``, not the prompt (BLIP/X-VLM: prompt ``"a picture of "``,
default none here).

Generation runs the decoder exactly ``max_length`` times per batch (no stop when every beam has ended), so ranks
stay in lockstep under ZeRO-3. ``options.scst`` trains self-critically: the CIDEr-D of sampled captions minus that
of the greedy caption weights the samples' log-likelihood; rewards are scored against each sample's own references
(build the train shards with a caption list per image to use all of them), document frequencies over the batch.
Evaluation: BLEU-1..4 and CIDEr-D (``finetune.metrics.captioning``); ``chance`` is the CIDEr-D of predicting the
most frequent training caption (read from ``options.train_captions``; without it, the most frequent reference of
the evaluated split).
"""

from __future__ import annotations

import sys
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.masking_utils import create_causal_mask

from data_shards.reader import ShardReader
from finetune.loop import DataError, EvalContext, TaskSpec, run
from finetune.metrics.captioning import cider_d, tokenize
from finetune.metrics.captioning import evaluate as caption_metrics
from pretrain.config import ConfigError
from pretrain.models.encoded import concept_inputs
from pretrain.models.text import FusionBert
from pretrain.text import pre_caption

IGNORE = -100
DROPPED_HEADS = ("vision_proj", "text_proj", "itm_head", "temp")


@dataclass(frozen=True)
class Options:
    prompt: str = ""                   # X-VLM / BLIP: "a picture of "
    label_smoothing: float = 0.0       # X-VLM: 0.1
    beam_size: int = 3
    max_length: int = 20               # tokens generated after the prompt, [SEP] included = decoder calls per batch
    min_length: int = 5                # [SEP] is not allowed before this many caption tokens
    length_penalty: float = 1.0        # beams are ranked by log-likelihood / length ** length_penalty
    scst: bool = False                 # self-critical training (CIDEr-D reward, greedy baseline) instead of LM loss
    scst_samples: int = 5              # sampled captions per image
    train_captions: str | None = None  # train shards, for the chance score (the most frequent training caption)

    def __post_init__(self):
        if self.beam_size < 1 or self.scst_samples < 1 or not 0 <= self.min_length < self.max_length:
            raise ConfigError(f"options: need beam_size >= 1, scst_samples >= 1 and 0 <= min_length < max_length, "
                              f"got beam_size={self.beam_size}, scst_samples={self.scst_samples}, "
                              f"min_length={self.min_length}, max_length={self.max_length}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"options.label_smoothing must be in [0, 1), got {self.label_smoothing}")


class CaptionDecoder(FusionBert):
    """A ``FusionBert`` whose self-attention is causal in every layer: ``forward(ids, mask, image_tokens)`` gives
    the states that predict each next token; ``mlm_logits`` is the LM head."""

    @classmethod
    def from_encoder(cls, encoder: FusionBert) -> CaptionDecoder:
        decoder = cls(encoder.config, encoder.fusion_layer, encoder.encoder_width,
                      with_mlm_head=encoder.cls is not None,
                      attention_implementation=encoder.config._attn_implementation)
        decoder.load_state_dict(encoder.state_dict())
        decoder.set_grad_checkpointing(encoder.grad_checkpointing)
        return decoder

    def _self_attention_mask(self, hidden: torch.Tensor, attention_mask: torch.Tensor):
        # The layers were built bidirectional (is_causal False), so the causal mask must always be explicit.
        return create_causal_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask,
                                  past_key_values=None, allow_is_causal_skip=False)

    def extend(self, input_ids: torch.Tensor, image_embeds: torch.Tensor, cache: EncoderDecoderCache) -> torch.Tensor:
        """States of ``input_ids`` ``[rows, n]`` following the tokens whose keys and values ``cache`` holds (the
        whole sequence when it is empty); the call adds theirs. Generation runs one token per call this way."""
        past = cache.get_seq_length()
        hidden = self.bert.embeddings(input_ids=input_ids, past_key_values_length=past)
        mask = None  # one new token attends to every cached one and itself
        if input_ids.shape[1] > 1:
            if past:
                raise ValueError("extend takes one token at a time once the cache holds a prefix")
            mask = self._self_attention_mask(hidden, torch.ones_like(input_ids))
        for index, layer in enumerate(self.bert.encoder.layer):
            images = (image_embeds, None) if index >= self.fusion_layer else ()
            hidden = layer(hidden, mask, *images, past_key_values=cache)
        return hidden


def decode(next_log_probs: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor], prompt: torch.Tensor, *,
           steps: int, end_id: int, pad_id: int, beam_size: int = 1, min_length: int = 0, length_penalty: float = 1.0,
           sample: bool = False) -> torch.Tensor:
    """Generated ids ``[B, steps]`` after ``prompt`` ``[B, P]`` (``pad_id`` after ``end_id``), calling
    ``next_log_probs(tokens, origin)`` exactly ``steps`` times: the next-token log-probs ``[rows, vocab]`` once
    ``tokens`` ``[rows, n]`` are appended to the rows ``origin`` ``[rows]`` of the previous call (the first call gets
    the prompts, each repeated per beam, and ``origin`` None).

    Beam search keeps ``beam_size`` rows per prompt (an ended beam keeps its score and grows by ``pad_id``) and
    returns the beam with the best ``score / length ** length_penalty`` (Hugging Face's rule; the length counts the
    generated tokens up to ``end_id``); ``beam_size`` 1 is greedy decoding. ``sample``
    draws each row's tokens from the model's distribution instead (one row per prompt row)."""
    batch, width = prompt.shape[0], 1 if sample else beam_size
    device = prompt.device
    scores = torch.zeros(batch, width, device=device)
    scores[:, 1:] = float("-inf")  # all beams start equal: expand only the first
    ended = torch.zeros(batch * width, dtype=torch.bool, device=device)
    lengths = torch.zeros(batch * width, device=device)
    generated = torch.zeros(batch * width, 0, dtype=torch.long, device=device)
    tokens, origin = prompt.repeat_interleave(width, dim=0), None
    for step in range(steps):
        log_probs = next_log_probs(tokens, origin).float()
        if step < min_length:
            log_probs[:, end_id] = float("-inf")
        log_probs[ended] = float("-inf")
        log_probs[ended, pad_id] = 0.0
        if sample:
            token = torch.multinomial(log_probs.exp(), 1).squeeze(1)
            origin = torch.arange(batch, device=device)
        else:
            vocab = log_probs.shape[1]
            scores, index = (scores.reshape(-1, 1) + log_probs).reshape(batch, -1).topk(width, dim=1)
            origin = (index // vocab + width * torch.arange(batch, device=device)[:, None]).reshape(-1)
            token = (index % vocab).reshape(-1)
        lengths = lengths[origin] + (~ended[origin]).float()
        ended = ended[origin] | (token == end_id)
        generated = torch.cat([generated[origin], token[:, None]], dim=1)
        tokens = token[:, None]
    if sample:
        return generated
    best = (scores / lengths.reshape(batch, width) ** length_penalty).argmax(dim=1)
    return generated.reshape(batch, width, steps)[torch.arange(batch, device=device), best]


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """``[CLS]`` and the prompt's word pieces (no ``[SEP]``), as every caption starts."""
    return [tokenizer.cls_token_id, *tokenizer.tokenizer(prompt.strip(), add_special_tokens=False)["input_ids"]]


class CaptionBatch:
    """Loader-side adapter: each sample's references (``json.captions``) and image id; for LM training also one
    caption at random as ``[CLS] prompt caption [SEP]`` ids and next-token ``targets`` (-100 on prompt and pad)."""

    def __init__(self, tokenizer, options: Options, train: bool):
        self.tokenizer, self.options, self.train = tokenizer, options, train
        self.prompt_length = len(prompt_ids(tokenizer, options.prompt))
        self.calls = 0

    def __call__(self, batch: dict) -> dict:
        references, image_ids = [], []
        for key, text, meta in zip(batch["__key__"], batch["text"], batch["meta"], strict=True):
            captions = [caption for caption in meta.get("captions") or [text] if caption and caption.strip()]
            if not captions:
                raise DataError(f"captioning sample {key!r} has no caption (json.captions or txt); "
                                f"build the shards with --format caption")
            references.append(captions)
            image_ids.append(meta.get("image_id", key))
        out = {**batch, "references": references, "image_id": image_ids}
        if self.train and not self.options.scst:
            texts = [f"{self.options.prompt.strip()} {pre_caption(self._choose(key, captions))}".strip()
                     for key, captions in zip(batch["__key__"], references, strict=True)]
            out.update(caption_tokens(self.tokenizer, texts, self.prompt_length))
        self.calls += 1
        return out

    def _choose(self, key: str, captions: list[str]) -> str:
        return captions[zlib.crc32(f"{key}:{self.calls}".encode()) % len(captions)]


def caption_tokens(tokenizer, texts: list[str], prompt_length: int) -> dict:
    """``input_ids``/``attention_mask`` of ``[CLS] text [SEP]`` (the tokenizer's ``[SEP]`` or one appended) and
    ``targets``: the ids with -100 on the prompt and padding."""
    tokens = tokenizer(texts)
    input_ids, attention_mask = tokens["input_ids"], tokens["attention_mask"]
    if not tokenizer.trailing_sep:
        lengths = attention_mask.sum(dim=1)
        input_ids = F.pad(input_ids, (0, 1), value=tokenizer.pad_token_id)
        attention_mask = F.pad(attention_mask, (0, 1), value=0)
        input_ids[torch.arange(len(texts)), lengths] = tokenizer.sep_token_id
        attention_mask[torch.arange(len(texts)), lengths] = 1
    targets = input_ids.masked_fill(attention_mask == 0, IGNORE)
    targets[:, :prompt_length] = IGNORE
    return {"input_ids": input_ids, "attention_mask": attention_mask, "targets": targets}


class CaptionTask(nn.Module):
    """forward(batch) -> {"loss", "lm"} (or {"loss", "scst", "reward", "greedy_reward"}); predict(batch) ->
    ``[{"image_id", "caption", "references"}]``. The backbone is ``model``; its text encoder is the decoder."""

    def __init__(self, model, tokenizer, options: Options):
        super().__init__()
        if model.text_encoder.cls is None:
            raise ValueError("captioning needs the text encoder's MLM head as its LM head")
        model.text_encoder = CaptionDecoder.from_encoder(model.text_encoder)
        for name in DROPPED_HEADS:
            setattr(model, name, None)
        self.model = model
        self.options = options
        self.tokenizer = tokenizer
        self.prompt = prompt_ids(tokenizer, options.prompt)
        self.chance_captions: dict[str | None, str] = {}  # train shards -> most frequent caption, read once

    @property
    def decoder(self) -> CaptionDecoder:
        return self.model.text_encoder

    def image_tokens(self, images: torch.Tensor, concepts=None) -> torch.Tensor:
        return self.model.image_tokens(images.to(next(self.model.visual_encoder.parameters()).dtype), concepts)

    def forward(self, batch: dict) -> dict:
        image_tokens = self.image_tokens(batch["image"], concept_inputs(batch))
        if self.options.scst:
            return self._self_critical(image_tokens, batch["references"])
        targets = batch["targets"][:, 1:]
        hidden = self.decoder(batch["input_ids"], batch["attention_mask"], image_tokens)[:, :-1]
        scored = targets != IGNORE  # the LM head runs on the positions with a target only
        logits = self.decoder.mlm_logits(hidden[scored])
        loss = F.cross_entropy(logits.float(), targets[scored], label_smoothing=self.options.label_smoothing)
        return {"loss": loss, "lm": loss.detach()}

    def _next_log_probs(self, image_tokens: torch.Tensor):
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        images = None

        def next_log_probs(tokens: torch.Tensor, origin: torch.Tensor | None) -> torch.Tensor:
            nonlocal images
            if origin is None:
                images = image_tokens.repeat_interleave(tokens.shape[0] // image_tokens.shape[0], dim=0)
            else:
                cache.reorder_cache(origin)
            hidden = self.decoder.extend(tokens, images, cache)[:, -1]
            return F.log_softmax(self.decoder.mlm_logits(hidden).float(), dim=-1)
        return next_log_probs

    def generate(self, image_tokens: torch.Tensor, *, beam_size: int, sample: bool = False) -> torch.Tensor:
        prompt = torch.tensor(self.prompt, device=image_tokens.device).expand(image_tokens.shape[0], -1)
        return decode(self._next_log_probs(image_tokens), prompt, steps=self.options.max_length,
                      end_id=self.tokenizer.sep_token_id, pad_id=self.tokenizer.pad_token_id,
                      beam_size=beam_size, min_length=self.options.min_length,
                      length_penalty=self.options.length_penalty, sample=sample)

    def captions(self, generated: torch.Tensor) -> list[str]:
        texts = []
        for row in generated.tolist():
            end = row.index(self.tokenizer.sep_token_id) if self.tokenizer.sep_token_id in row else len(row)
            texts.append(self.tokenizer.tokenizer.decode(row[:end], skip_special_tokens=True).strip())
        return texts

    def predict(self, batch: dict) -> list[dict]:
        generated = self.generate(self.image_tokens(batch["image"], concept_inputs(batch)),
                                  beam_size=self.options.beam_size)
        return [{"image_id": image_id, "caption": caption, "references": references} for image_id, caption, references
                in zip(batch["image_id"], self.captions(generated), batch["references"], strict=True)]

    def _self_critical(self, image_tokens: torch.Tensor, references: list[list[str]]) -> dict:
        samples = self.options.scst_samples
        was_training = self.training
        with torch.no_grad():
            self.eval()
            greedy = self.generate(image_tokens, beam_size=1)
            self.train(was_training)
            sampled = self.generate(image_tokens.repeat_interleave(samples, dim=0), beam_size=1, sample=True)
        # One CIDEr-D call for both, so both are weighed with the same document frequencies.
        texts = self.captions(sampled) + self.captions(greedy)
        tokenized = [[tokenize(caption) for caption in image] for image in references]
        per_caption = [tokenized[index // samples] for index in range(len(sampled))] + tokenized
        rewards = torch.tensor(cider_d([tokenize(text) for text in texts], per_caption)[1], device=sampled.device)
        sample_reward, greedy_reward = rewards[:len(sampled)], rewards[len(sampled):]
        advantage = sample_reward - greedy_reward.repeat_interleave(samples)
        prompt = torch.tensor(self.prompt, device=sampled.device).expand(len(sampled), -1)
        sequences = torch.cat([prompt, sampled], dim=1)
        hidden = self.decoder(sequences, torch.ones_like(sequences), image_tokens.repeat_interleave(samples, dim=0))
        log_probs = F.log_softmax(self.decoder.mlm_logits(hidden[:, prompt.shape[1] - 1:-1]).float(), dim=-1)
        token_log_probs = log_probs.gather(2, sampled[:, :, None]).squeeze(2)
        is_end = (sampled == self.tokenizer.sep_token_id).long()
        scored = (is_end.cumsum(dim=1) - is_end == 0).float()  # the caption's tokens and its [SEP], not the padding
        loss = -(advantage[:, None] * token_log_probs * scored).sum() / scored.sum()
        return {"loss": loss, "scst": loss.detach(), "reward": sample_reward.mean(),
                "greedy_reward": greedy_reward.mean()}


def most_frequent_caption(captions) -> str:
    """The most frequent caption after coco-caption tokenisation (on a tie the alphabetically first, so the order
    the shards are read in does not matter)."""
    counts = Counter(" ".join(tokenize(caption)) for caption in captions)
    if not counts:
        raise DataError("no caption to pick the chance caption from")
    return min(counts.items(), key=lambda item: (-item[1], item[0]))[0]


def _shard_captions(urls: str):
    for sample in ShardReader(urls, rank=0, world_size=1, shard_shuffle=False):
        meta = sample.get("json") or {}
        yield from meta.get("captions") or [sample.get("txt") or ""]


def evaluate(context: EvalContext) -> dict:
    """Beam-search captions of the split scored against each image's references; ``chance`` as in the module doc."""
    predictions, references = {}, {}
    for prediction in context.predictions():
        image_id = prediction["image_id"]
        predictions.setdefault(image_id, prediction["caption"])
        known = references.setdefault(image_id, [])
        known.extend(caption for caption in prediction["references"] if caption not in known)
    if not references:
        raise DataError(f"{context.split} split {context.urls!r} holds no sample")
    metrics = caption_metrics(predictions, references)
    source = context.options.train_captions
    module = context.module
    if source not in module.chance_captions:
        pool = _shard_captions(source) if source else (caption for image in references.values() for caption in image)
        module.chance_captions[source] = most_frequent_caption(pool)
    chance = caption_metrics({image_id: module.chance_captions[source] for image_id in references}, references)
    metrics.update(chance=chance["cider"], chance_bleu_4=chance["bleu_4"])
    return metrics


SPEC = TaskSpec(name="captioning", options=Options,
                build=lambda model, tokenizer, options: CaptionTask(model, tokenizer, options),
                adapter=lambda tokenizer, options, train: CaptionBatch(tokenizer, options, train),
                evaluate=evaluate, metric="cider",
                unused_keys=tuple(f"model.{name}*" for name in DROPPED_HEADS))

if __name__ == "__main__":
    sys.exit(run(SPEC))
