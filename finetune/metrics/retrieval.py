"""Image-text retrieval metrics: R@1/5/10 of both directions, and ITM re-ranking of the ITC top k.

``retrieval_metrics`` checks its inputs and computes ALBEF's ``itm_eval`` (reference/albef.md section 6) with the
implementation in ``pretrain.retrieval_eval``, which zero-shot evaluation during pretraining uses too:

- text retrieval (``txt_r*``): for image ``i``, rank = the best position of any of its captions ``img2txts[i]``
  in ``scores_i2t[i]`` sorted in descending order;
- image retrieval (``img_r*``): for text ``t``, rank = the position of its image ``txt2img[t]`` in ``scores_t2i[t]``;
- ``R@K = 100 * mean(rank < K)``; ``txt_r_mean`` and ``img_r_mean`` average K = 1, 5, 10 and ``r_mean`` averages
  the two.

Ties are ranked by index: among equal scores the candidate with the lower index comes first (a stable sort of
the negated scores). A ground truth tied with a lower-numbered wrong candidate therefore ranks after it, and the
metric is reproducible. ALBEF's numpy quicksort leaves tie order to the sort implementation.

``rerank_with_itm`` is ALBEF's fine-tuned evaluation: per query row, the top ``k`` candidates by ITC similarity
are scored again by the ITM head (its positive-class logit alone; the ITC score is not added) and every other
candidate gets ``-inf``. Run it on ``itc_scores`` for image-to-text and on ``itc_scores.T`` for text-to-image,
then pass both matrices to ``retrieval_metrics``::

    scores_i2t = rerank_with_itm(similarity, k, lambda image, texts: itm_logits(image, texts))
    scores_t2i = rerank_with_itm(similarity.T, k, lambda text, images: itm_logits_per_text(text, images))
    metrics = retrieval_metrics(scores_i2t, txt2img, img2txts, scores_t2i=scores_t2i)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch

from pretrain.retrieval_eval import chance_r1
from pretrain.retrieval_eval import retrieval_metrics as _itm_eval

__all__ = ["chance_r1", "rerank_with_itm", "retrieval_metrics"]


def _as_array(scores, name: str) -> np.ndarray:
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().float().cpu().numpy()
    array = np.asarray(scores, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-d matrix, got shape {array.shape}")
    if np.isnan(array).any():
        raise ValueError(f"{name} holds NaN scores; NaN has no rank")
    return array


def _check_ground_truth(txt2img: Sequence[int], img2txts: Sequence[Sequence[int]], images: int, texts: int) -> None:
    if len(img2txts) != images:
        raise ValueError(f"img2txts has {len(img2txts)} entries but the score matrix has {images} image rows")
    if len(txt2img) != texts:
        raise ValueError(f"txt2img has {len(txt2img)} entries but the score matrix has {texts} text columns")
    for text, image in enumerate(txt2img):
        if not 0 <= image < images:
            raise ValueError(f"txt2img[{text}] = {image} is not an image index (0..{images - 1})")
    for image, captions in enumerate(img2txts):
        if not captions:
            raise ValueError(f"image {image} has no caption in img2txts; every image needs at least one")
        for text in captions:
            if not 0 <= text < texts or txt2img[text] != image:
                raise ValueError(f"img2txts[{image}] lists text {text}, whose image in txt2img is "
                                 f"{txt2img[text] if 0 <= text < texts else 'out of range'}; the two maps disagree")


def retrieval_metrics(scores_i2t, txt2img: Sequence[int], img2txts: Sequence[Sequence[int]],
                      scores_t2i=None) -> dict[str, float]:
    """R@1/5/10 of text and image retrieval in percent, and their means (see the module docstring).

    ``scores_i2t`` is ``[n_images, n_texts]`` (numpy array or tensor). ``scores_t2i`` is ``[n_texts, n_images]``
    and defaults to ``scores_i2t.T``; ITM re-ranking gives a different matrix per direction. Ties rank by index.
    """
    image_to_text = _as_array(scores_i2t, "scores_i2t")
    text_to_image = image_to_text.T if scores_t2i is None else _as_array(scores_t2i, "scores_t2i")
    if text_to_image.shape != image_to_text.shape[::-1]:
        raise ValueError(f"scores_t2i has shape {text_to_image.shape}; expected {image_to_text.shape[::-1]}, "
                         "the transpose of scores_i2t")
    _check_ground_truth(txt2img, img2txts, *image_to_text.shape)
    return _itm_eval(image_to_text, text_to_image, [list(captions) for captions in img2txts], list(txt2img))


def rerank_with_itm(itc_scores, k: int, itm_score_fn: Callable[[int, torch.Tensor], torch.Tensor],
                    rows: Iterable[int] | None = None) -> torch.Tensor:
    """Replace each row's top ``k`` ITC scores by ITM scores and every other score by ``-inf``.

    ``itc_scores`` is ``[n_queries, n_candidates]``. ``itm_score_fn(query, candidates)`` gets a query (row) index
    and the ``[k]`` candidate indices (best ITC first) and returns their ``[k]`` ITM scores. ``k`` larger than
    the number of candidates re-scores them all. Candidates tied at the ``k``-th ITC score are taken in index
    order. ``rows`` restricts the work to some rows (the others stay ``-inf``), to split a matrix across ranks:
    merge the parts with an element-wise maximum (``all_reduce`` with ``MAX``), not a sum.
    """
    similarity = torch.as_tensor(itc_scores)
    if similarity.ndim != 2:
        raise ValueError(f"itc_scores must be a 2-d matrix, got shape {tuple(similarity.shape)}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    k = min(k, similarity.shape[1])
    dtype = similarity.dtype if similarity.is_floating_point() else torch.float32
    reranked = torch.full(similarity.shape, float("-inf"), dtype=dtype, device=similarity.device)
    for row in range(similarity.shape[0]) if rows is None else rows:
        candidates = torch.sort(similarity[row], descending=True, stable=True).indices[:k]
        scores = torch.as_tensor(itm_score_fn(row, candidates)).reshape(-1)
        if scores.numel() != k:
            raise ValueError(f"itm_score_fn returned {scores.numel()} scores for row {row}; expected {k}, "
                             "one per candidate")
        reranked[row, candidates] = scores.to(device=reranked.device, dtype=dtype)
    return reranked
