"""Retrieval metric against a brute-force rank count with ties and 5 captions per image, input checks, and
ITM re-ranking of the ITC top k against a per-row loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pretrain.retrieval_eval
from finetune.metrics.retrieval import chance_r1, rerank_with_itm, retrieval_metrics


def caption_maps(images: int, per_image: int) -> tuple[list[int], list[list[int]]]:
    img2txts = [list(range(i * per_image, (i + 1) * per_image)) for i in range(images)]
    return [i for i in range(images) for _ in range(per_image)], img2txts


def brute_force_rank(row, wanted: int) -> int:
    """Candidates ranked before ``wanted``: higher scores, and equal scores at lower indices."""
    return sum(1 for j, value in enumerate(row) if value > row[wanted] or (value == row[wanted] and j < wanted))


def brute_force(scores_i2t, scores_t2i, txt2img, img2txts) -> dict:
    text_ranks = [min(brute_force_rank(scores_i2t[i], t) for t in texts) for i, texts in enumerate(img2txts)]
    image_ranks = [brute_force_rank(scores_t2i[t], image) for t, image in enumerate(txt2img)]
    out = {}
    for prefix, ranks in (("txt", text_ranks), ("img", image_ranks)):
        for k in (1, 5, 10):
            out[f"{prefix}_r{k}"] = 100.0 * sum(rank < k for rank in ranks) / len(ranks)
        out[f"{prefix}_r_mean"] = (out[f"{prefix}_r1"] + out[f"{prefix}_r5"] + out[f"{prefix}_r10"]) / 3
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force_with_ties_and_five_captions(seed):
    rng = np.random.default_rng(seed)
    txt2img, img2txts = caption_maps(images=13, per_image=5)
    scores_i2t = rng.integers(0, 4, size=(13, 65)).astype(float)  # four values: many ties
    scores_t2i = rng.integers(0, 3, size=(65, 13)).astype(float)
    assert retrieval_metrics(scores_i2t, txt2img, img2txts) == pytest.approx(
        brute_force(scores_i2t, scores_i2t.T, txt2img, img2txts))
    assert retrieval_metrics(scores_i2t, txt2img, img2txts, scores_t2i=scores_t2i) == pytest.approx(
        brute_force(scores_i2t, scores_t2i, txt2img, img2txts))


def test_all_scores_tied_rank_by_index():
    txt2img, img2txts = caption_maps(images=2, per_image=5)
    metrics = retrieval_metrics(np.zeros((2, 10)), txt2img, img2txts)
    # image 0's captions 0-4 come first (rank 0); image 1's best caption 5 has rank 5: outside R@5, inside R@10
    assert (metrics["txt_r1"], metrics["txt_r5"], metrics["txt_r10"]) == (50.0, 50.0, 100.0)
    # every text sees image 0 first: texts of image 0 rank 0, texts of image 1 rank 1
    assert (metrics["img_r1"], metrics["img_r5"]) == (50.0, 100.0)


def test_known_values_and_tensor_input():
    txt2img, img2txts = [0, 0, 1, 1, 2], [[0, 1], [2, 3], [4]]
    scores = torch.tensor([[0.9, 0.1, 0.0, 0.0, 0.0],    # image 0: caption 0 first
                           [0.8, 0.7, 0.6, 0.5, 0.0],    # image 1: its best caption 2 is third
                           [0.0, 0.0, 0.0, 0.0, 0.1]])   # image 2: caption 4 first
    metrics = retrieval_metrics(scores, txt2img, img2txts)
    assert metrics["txt_r1"] == pytest.approx(200 / 3) and metrics["txt_r5"] == 100.0
    # text columns: 0 -> image 0 first; 1 -> image 1 (0.7) before image 0 (0.1); 2, 3 -> image 1; 4 -> image 2
    assert metrics["img_r1"] == pytest.approx(80.0)
    assert metrics["r_mean"] == pytest.approx(((200 / 3 + 100 + 100) / 3 + (80 + 100 + 100) / 3) / 2)


def test_reuses_the_pretraining_metric():
    assert chance_r1 is pretrain.retrieval_eval.chance_r1


@pytest.mark.parametrize(("scores", "txt2img", "img2txts", "message"), [
    (np.zeros((2, 3)), [0, 0, 1], [[0, 1]], "img2txts has 1 entries but the score matrix has 2 image rows"),
    (np.zeros((2, 3)), [0, 1], [[0], [1]], "txt2img has 2 entries but the score matrix has 3 text columns"),
    (np.zeros((2, 2)), [0, 2], [[0], [1]], r"txt2img\[1\] = 2 is not an image index"),
    (np.zeros((2, 2)), [0, 1], [[0], []], "image 1 has no caption"),
    (np.zeros((2, 2)), [0, 0], [[0], [1]], "img2txts\\[1\\] lists text 1, whose image in txt2img is 0"),
    (np.zeros((2, 2)), [0, 1], [[0], [5]], "lists text 5, whose image in txt2img is out of range"),
    (np.zeros(4), [0], [[0]], "must be a 2-d matrix"),
    (np.full((1, 1), np.nan), [0], [[0]], "NaN"),
])
def test_input_errors(scores, txt2img, img2txts, message):
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(scores, txt2img, img2txts)


def test_t2i_shape_error():
    with pytest.raises(ValueError, match=r"scores_t2i has shape \(2, 2\); expected \(3, 2\)"):
        retrieval_metrics(np.zeros((2, 3)), [0, 0, 1], [[0, 1], [2]], scores_t2i=np.zeros((2, 2)))


def itm_table(seed: int, shape: tuple[int, int]) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_rerank_keeps_top_k_and_fills_the_rest():
    itc = torch.tensor([[0.1, 0.9, 0.5, 0.7],
                        [0.4, 0.4, 0.4, 0.1]])  # row 1: a three-way tie for the top 2
    itm = torch.tensor([[10.0, 11, 12, 13], [20, 21, 22, 23]])
    calls = []

    def itm_score_fn(row, candidates):
        calls.append((row, candidates.tolist()))
        return itm[row, candidates]

    reranked = rerank_with_itm(itc, 2, itm_score_fn)
    assert calls == [(0, [1, 3]), (1, [0, 1])]  # best ITC first; ties taken in index order
    inf = float("-inf")
    assert reranked.tolist() == [[inf, 11.0, inf, 13.0], [20.0, 21.0, inf, inf]]


def test_rerank_equals_per_row_loop():
    itc, itm = itm_table(0, (7, 11)), itm_table(1, (7, 11))
    reranked = rerank_with_itm(itc, 4, lambda row, candidates: itm[row, candidates])
    for row in range(7):
        top = set(np.argsort(-itc[row].numpy(), kind="stable")[:4].tolist())
        for column in range(11):
            assert reranked[row, column].item() == (itm[row, column].item() if column in top else float("-inf"))


def test_rerank_k_larger_than_candidates_rescores_all():
    itc, itm = itm_table(2, (3, 5)), itm_table(3, (3, 5))
    torch.testing.assert_close(rerank_with_itm(itc, 256, lambda row, candidates: itm[row, candidates]), itm)


def test_rerank_rows_merge_with_maximum():
    itc, itm = itm_table(4, (6, 9)), itm_table(5, (6, 9))
    score = lambda row, candidates: itm[row, candidates]
    whole = rerank_with_itm(itc, 3, score)
    first, second = rerank_with_itm(itc, 3, score, rows=range(0, 3)), rerank_with_itm(itc, 3, score, rows=[3, 4, 5])
    assert torch.isinf(first[3:]).all() and torch.isinf(second[:3]).all()
    torch.testing.assert_close(torch.maximum(first, second), whole)


def test_rerank_then_metrics_fixes_an_itc_mistake():
    txt2img, img2txts = [0, 1], [[0], [1]]
    itc = torch.tensor([[0.4, 0.6], [0.3, 0.7]])       # ITC ranks text 1 first for image 0
    itm = torch.tensor([[5.0, -5.0], [-5.0, 5.0]])     # ITM gets both right
    scores_i2t = rerank_with_itm(itc, 2, lambda image, texts: itm[image, texts])
    scores_t2i = rerank_with_itm(itc.T, 2, lambda text, images: itm.T[text, images])
    assert retrieval_metrics(itc, txt2img, img2txts)["txt_r1"] == 50.0
    assert retrieval_metrics(scores_i2t, txt2img, img2txts, scores_t2i=scores_t2i)["r_mean"] == 100.0


def test_rerank_errors():
    with pytest.raises(ValueError, match="k must be at least 1"):
        rerank_with_itm(torch.zeros(2, 2), 0, lambda row, candidates: torch.zeros(0))
    with pytest.raises(ValueError, match="returned 1 scores for row 0; expected 2"):
        rerank_with_itm(torch.zeros(2, 3), 2, lambda row, candidates: torch.zeros(1))
    with pytest.raises(ValueError, match="2-d matrix"):
        rerank_with_itm(torch.zeros(3), 1, lambda row, candidates: torch.zeros(1))
