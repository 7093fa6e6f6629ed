"""Image-text retrieval fine-tuning (ALBEF ``Retrieval.py``): ITC with multi-positive targets + ITM.

    python -m finetune.retrieval --config finetune/configs/retrieval_coco.yaml --checkpoint runs/albef/checkpoints
    deepspeed --num_gpus 8 --module finetune.retrieval --config ... --checkpoint ... \
        --deepspeed_config ds_configs/zero2_bf16.json

Data: train shards hold one sample per (image, caption) pair with ``json.image_id`` (``data_shards build
--format coco`` on a Karpathy-style train file); val/test shards hold one sample per image with all its
captions in ``json.captions`` (the same format on the eval files, whose records list the captions).

Training: contrastive targets spread over every column showing the same image (ALBEF's ``idx``
positives), columns gathered from all ranks; ITM on the positives and one hard negative per image and
per text drawn from the similarities, never from the same image. Evaluation (reference/albef.md
section 5): every pair scored by ITC, the top ``k_test`` of each row re-scored by the ITM head, then
R@1/5/10 both ways and their mean (section 6); ``chance_r1`` is the expected R@1 of random scores.
Unlike ALBEF, fine-tuning starts without the momentum copies and queues: negatives are the global batch
and the targets carry no distillation term.
"""

from __future__ import annotations

import math
import sys
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from finetune.loop import DataError, EvalContext, TaskSpec, eval_transform, run
from pretrain.models.encoded import concept_inputs
from pretrain.objectives.itc import contrastive_loss_in_batch
from pretrain.objectives.itm import itm_labels, itm_loss, itm_valid_mask, same_image_exclusion, sample_hard_negatives
from pretrain.retrieval_eval import chance_r1, load_split, retrieval_metrics, split_concepts
from pretrain.text import pre_caption


@dataclass(frozen=True)
class Options:
    itm_weight: float = 1.0
    k_test: int = 256              # ITC candidates per row re-scored by ITM (ALBEF: 256 COCO, 128 Flickr)
    rerank_with_itm: bool = True   # False: rank by ITC alone (faster, for quick checks)


class RetrievalBatch:
    """Loader-side adapter: a caption per sample (a random one of ``captions`` when it lists several),
    tokens, and the image id of every sample as a tensor."""

    def __init__(self, tokenizer, train: bool):
        self.tokenizer, self.train = tokenizer, train
        self.calls = 0

    def __call__(self, batch: dict) -> dict:
        texts, ids = [], []
        for key, text, meta in zip(batch["__key__"], batch["text"], batch["meta"], strict=True):
            captions = meta.get("captions") or [text]
            if "image_id" not in meta and self.train:
                raise DataError(f"retrieval sample {key!r} has no json.image_id (build with --format coco)")
            choice = zlib.crc32(f"{key}:{self.calls}".encode()) % len(captions) if self.train else 0
            texts.append(pre_caption(captions[choice]))
            ids.append(numeric_image_id(meta.get("image_id", -1)))
        self.calls += 1
        tokens = self.tokenizer(texts)
        return {**batch, "text": texts, "input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"],
                "image_id": torch.tensor(ids)}


def numeric_image_id(value) -> int:
    """An image id as a number for the same-image masks: integers (and digit strings) as themselves, other
    strings (``"coco_328757"``, as LAVIS writes them) as a CRC above 2**40, clear of any integer id."""
    if isinstance(value, int) or (isinstance(value, str) and value.strip().lstrip("-").isdigit()):
        return int(value)
    return (1 << 40) + zlib.crc32(str(value).encode())


class RetrievalTask(nn.Module):
    """forward(batch) -> {"loss", "itc", "itm"}; the backbone is ``model`` (ALBEF names under ``model.``)."""

    def __init__(self, model, options: Options):
        super().__init__()
        self.model = model
        self.options = options
        model.text_encoder.cls = None  # the MLM head is not used by retrieval

    def forward(self, batch: dict) -> dict:
        encoded = self.model.encode(batch["image"], batch["input_ids"], batch["attention_mask"],
                                    concepts=concept_inputs(batch))
        ids = batch["image_id"]
        losses = {"itc": contrastive_loss_in_batch(encoded.image_feat, encoded.text_feat, self.model.temp, ids)}
        if self.options.itm_weight:
            losses["itm"] = self._itm(encoded.image_tokens, encoded.image_feat, encoded.text_hidden,
                                      encoded.text_feat, batch["attention_mask"], ids)
        losses["loss"] = losses["itc"] + self.options.itm_weight * losses.get("itm", 0.0)
        return losses

    def _itm(self, image_tokens, image_feat, text_hidden, text_feat, attention_mask, ids):
        batch_size = image_tokens.shape[0]
        exclude = same_image_exclusion(ids)
        with torch.no_grad():
            sim = image_feat.float() @ text_feat.float().T / self.model.temp.float()
            negative_image, negative_text = sample_hard_negatives(sim, sim.T, exclude)
        texts = torch.cat([text_hidden, text_hidden, text_hidden[negative_text]])
        masks = torch.cat([attention_mask, attention_mask, attention_mask[negative_text]])
        images = torch.cat([image_tokens, image_tokens[negative_image], image_tokens])
        logits = self.model.itm_head(self.model.fused_cls(texts, masks, images))
        return itm_loss(logits.float(), itm_labels(batch_size, logits.device), itm_valid_mask(exclude))


def _read_split(context: EvalContext, metas: list | None = None):
    try:
        return load_split(context.urls, eval_transform(context.image_size, context.transform), metas)
    except ValueError as error:
        raise DataError(f"{context.split} split: {error}") from None


@torch.no_grad()
def evaluate(context: EvalContext) -> dict:
    """ITC scores for every pair on every rank; ITM re-scoring of each row's top k shared among ranks."""
    module, options = context.module, context.options
    model = module.model
    device, dtype = model.vision_proj.weight.device, model.vision_proj.weight.dtype
    metas = []
    images, texts, img2txt, txt2img = _read_split(context, metas)
    concept_adapter = getattr(context.adapter, "concepts", None)  # the loop's ConceptBatch, when the model reads them
    was_training = module.training
    module.eval()
    size = context.batch_size
    image_tokens, image_feats = [], []
    for start in range(0, len(images), size):
        concepts = (split_concepts(concept_adapter, metas, start, start + size, device)
                    if concept_adapter is not None else None)
        tokens, feats = model.image_embeddings(torch.stack(images[start:start + size]).to(device, dtype), concepts)
        image_tokens.append(tokens)
        image_feats.append(feats.float())
    tokens = context.tokenizer(texts)  # one call: every text padded to the same length
    text_hidden, text_masks, text_feats = [], [], []
    for start in range(0, len(texts), size):
        ids = tokens["input_ids"][start:start + size].to(device)
        mask = tokens["attention_mask"][start:start + size].to(device)
        hidden, feats = model.text_embeddings(ids, mask)
        text_hidden.extend(hidden)
        text_masks.extend(mask)
        text_feats.append(feats.float())
    image_tokens = torch.cat(image_tokens)
    similarity = torch.cat(image_feats) @ torch.cat(text_feats).T
    scores_i2t, scores_t2i = similarity.cpu().numpy(), similarity.T.cpu().numpy()
    if options.rerank_with_itm:
        scores_i2t = _rerank(similarity, options.k_test, lambda row, columns: model.itm_head(model.fused_cls(
            torch.stack([text_hidden[c] for c in columns]), torch.stack([text_masks[c] for c in columns]),
            image_tokens[row].expand(len(columns), -1, -1)))[:, 1].float())
        scores_t2i = _rerank(similarity.T, options.k_test, lambda row, columns: model.itm_head(model.fused_cls(
            text_hidden[row].expand(len(columns), -1, -1), text_masks[row].expand(len(columns), -1),
            image_tokens[columns]))[:, 1].float())
    module.train(was_training)
    metrics = retrieval_metrics(scores_i2t, scores_t2i, img2txt, txt2img)
    metrics["txt_r1_img_r1_mean"] = (metrics["txt_r1"] + metrics["img_r1"]) / 2
    metrics["chance_r1"] = chance_r1(img2txt, len(texts))
    metrics["chance"] = chance_r_mean(img2txt, len(texts))
    return metrics


def chance_r_mean(img2txt: list[list[int]], num_texts: int) -> float:
    """Expected ``r_mean`` of random scores: an image with n of T captions finds one in its top K with
    probability 1 - C(T-n, K) / C(T, K); a text finds its image in the top K of N with probability K / N."""
    num_images = len(img2txt)
    total = 0.0
    for k in (1, 5, 10):
        top = min(k, num_texts)
        text_side = np.mean([1 - math.comb(num_texts - len(wanted), top) / math.comb(num_texts, top)
                             for wanted in img2txt])
        total += 100 * (text_side + min(k, num_images) / num_images) / 2
    return total / 3


def _rerank(similarity: torch.Tensor, k: int, itm_scores) -> np.ndarray:
    """ALBEF's evaluation matrix: -100 everywhere except each row's top ``k`` ITC columns, which get the ITM
    positive logit. Rows are shared among ranks (every rank runs the same number of rows: collectives
    under ZeRO-3) and summed back with an all-reduce."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    rows, columns = similarity.shape
    k = min(k, columns)
    scores = torch.zeros((rows, columns), device=similarity.device)
    filled = torch.zeros((rows, columns), device=similarity.device)
    per_rank = -(-rows // world)
    mine = list(range(rank * per_rank, min(rows, (rank + 1) * per_rank)))
    for index in range(per_rank):
        row = mine[index] if index < len(mine) else mine[-1] if mine else 0
        top = similarity[row].topk(k).indices
        values = itm_scores(row, top.tolist())
        if index < len(mine):
            scores[row, top] = values.to(scores.dtype)
            filled[row, top] = 1.0
    if world > 1:
        dist.all_reduce(scores)
        dist.all_reduce(filled)
    return torch.where(filled > 0, scores, torch.full_like(scores, -100.0)).cpu().numpy()


SPEC = TaskSpec(name="retrieval", options=Options,
                build=lambda model, tokenizer, options: RetrievalTask(model, options),
                adapter=lambda tokenizer, options, train: RetrievalBatch(tokenizer, train),
                evaluate=evaluate, metric="r_mean", unused_keys=("model.text_encoder.cls.*",))

if __name__ == "__main__":
    sys.exit(run(SPEC))
