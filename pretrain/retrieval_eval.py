"""Image-text retrieval metrics (ALBEF ``itm_eval``) and zero-shot ITC retrieval on shards.

``retrieval_metrics`` implements reference/albef.md section 6: for image r, its rank is the best
position of any of its ground-truth captions in the descending order of ``scores_i2t[r]``; for text t,
the position of its image in ``scores_t2i[t]``. R@K = 100 x mean(rank < K). Ties are broken by index
order (a stable sort), so results are reproducible. ``zero_shot_retrieval`` embeds an evaluation split
(shards whose ``json.captions`` hold the captions of each image, e.g. built with ``--format coco``) and
scores every pair by ITC similarity; fine-tuned retrieval re-ranks with ITM (finetune package). A backbone
that reads visual concepts (ViCHA) gets every image's ``json.concepts``, all of them, as in evaluation.
"""

from __future__ import annotations

import numpy as np
import torch

from data_shards.boxes import TransformConfig
from data_shards.reader import ShardReader
from data_shards.transforms import PilTransform
from pretrain.models.concepts import ConceptBatch
from pretrain.schema import ConceptConfig
from pretrain.text import pre_caption


def _ranks(scores: np.ndarray, targets: list[list[int]]) -> np.ndarray:
    order = np.argsort(-scores, axis=1, kind="stable")
    positions = np.empty_like(order)
    rows = np.arange(scores.shape[0])[:, None]
    positions[rows, order] = np.arange(scores.shape[1])[None, :]
    return np.array([positions[row, wanted].min() for row, wanted in enumerate(targets)])


def retrieval_metrics(scores_i2t: np.ndarray, scores_t2i: np.ndarray, img2txt: list[list[int]],
                      txt2img: list[int]) -> dict:
    image_ranks = _ranks(np.asarray(scores_i2t), img2txt)
    text_ranks = _ranks(np.asarray(scores_t2i), [[image] for image in txt2img])
    result = {}
    for prefix, ranks in (("txt", image_ranks), ("img", text_ranks)):
        for k in (1, 5, 10):
            result[f"{prefix}_r{k}"] = 100.0 * float(np.mean(ranks < k))
        result[f"{prefix}_r_mean"] = (result[f"{prefix}_r1"] + result[f"{prefix}_r5"] + result[f"{prefix}_r10"]) / 3
    result["r_mean"] = (result["txt_r_mean"] + result["img_r_mean"]) / 2
    return result


def chance_r1(img2txt: list[list[int]], num_texts: int) -> float:
    """Expected R@1 of random scores, averaged over both directions, in percent."""
    text_side = float(np.mean([len(wanted) / num_texts for wanted in img2txt]))
    image_side = 1.0 / len(img2txt)
    return 100.0 * (text_side + image_side) / 2


def load_split(urls: str, transform: TransformConfig, metas: list | None = None) -> tuple[
        list[torch.Tensor], list[str], list[list[int]], list[int]]:
    """Every image of a retrieval split (``transform``, an evaluation one) and its cleaned captions, numbered in
    shard order: ``(images, texts, img2txt, txt2img)``. Zero-shot and fine-tuned retrieval both read splits here.
    ``metas``, a list, receives each image's json (its concepts, for a backbone that reads them)."""
    render = PilTransform(transform)
    images, texts, img2txt, txt2img = [], [], [], []
    for sample in ShardReader(urls, rank=0, world_size=1, shard_shuffle=False):
        item = render(sample)
        captions = item["meta"].get("captions") or [item["text"]]
        if metas is not None:
            metas.append((item["__key__"], item["meta"]))
        images.append(item["image"])
        img2txt.append(list(range(len(texts), len(texts) + len(captions))))
        txt2img.extend([len(images) - 1] * len(captions))
        texts.extend(pre_caption(caption) for caption in captions)
    if not images:
        raise ValueError(f"retrieval split {urls!r} holds no sample")
    return images, texts, img2txt, txt2img


def split_concepts(adapter: ConceptBatch, metas: list, start: int, stop: int, device):
    """``(concept_ids, concept_mask)`` of images ``start:stop`` of a split read with ``metas``, by an evaluation
    ``ConceptBatch`` (every concept of each image)."""
    chunk = metas[start:stop]
    tokens = adapter.tokenizer(adapter.texts([key for key, _ in chunk], [meta for _, meta in chunk]))
    return tokens["input_ids"].to(device), tokens["attention_mask"].to(device)


@torch.no_grad()
def zero_shot_retrieval(model, tokenizer, urls: str, image_size: int, batch_size: int = 64,
                        concepts: ConceptConfig | None = None) -> dict:
    """ITC-only retrieval on ``urls``; every rank runs it identically (ZeRO-3 needs all ranks). ``concepts``
    (``model.concepts``) is needed when the model reads visual concepts."""
    metas = []
    images, texts, img2txt, txt2img = load_split(urls, TransformConfig(image_size=image_size, train=False), metas)
    parameter = model.vision_proj.weight
    adapter = None
    if getattr(model, "concept_encoder", None) is not None:
        adapter = ConceptBatch(tokenizer, concepts or ConceptConfig(), train=False)
    was_training = model.training
    model.eval()
    image_feats = []
    for i in range(0, len(images), batch_size):
        concept_pair = split_concepts(adapter, metas, i, i + batch_size, parameter.device) if adapter else None
        image_feats.append(model.image_embeddings(torch.stack(images[i:i + batch_size]).to(parameter),
                                                  concept_pair)[1].float())
    text_feats = []
    for i in range(0, len(texts), batch_size):
        tokens = tokenizer(texts[i:i + batch_size])
        ids, mask = tokens["input_ids"].to(parameter.device), tokens["attention_mask"].to(parameter.device)
        text_feats.append(model.text_embeddings(ids, mask)[1].float())
    model.train(was_training)
    similarity = (torch.cat(image_feats) @ torch.cat(text_feats).T).cpu().numpy()
    metrics = retrieval_metrics(similarity, similarity.T, img2txt, txt2img)
    metrics["chance_r1"] = chance_r1(img2txt, len(texts))
    metrics["images"], metrics["texts"] = len(images), len(texts)
    return metrics
