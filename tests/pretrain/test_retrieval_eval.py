"""Retrieval metric against a brute-force count, including ties and 5 captions per image."""

from __future__ import annotations

import numpy as np
import pytest

from pretrain.retrieval_eval import chance_r1, retrieval_metrics


def brute_force_rank(row: np.ndarray, wanted: int) -> int:
    """Position of ``wanted`` in a descending order where ties keep index order."""
    return sum(1 for j, value in enumerate(row) if value > row[wanted] or (value == row[wanted] and j < wanted))


def brute_force(scores_i2t, scores_t2i, img2txt, txt2img) -> dict:
    image_ranks = [min(brute_force_rank(scores_i2t[i], t) for t in texts) for i, texts in enumerate(img2txt)]
    text_ranks = [brute_force_rank(scores_t2i[t], image) for t, image in enumerate(txt2img)]
    out = {}
    for prefix, ranks in (("txt", image_ranks), ("img", text_ranks)):
        for k in (1, 5, 10):
            out[f"{prefix}_r{k}"] = 100.0 * sum(rank < k for rank in ranks) / len(ranks)
    return out


@pytest.mark.parametrize("seed", range(5))
def test_matches_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    images, per_image = 12, 5
    img2txt = [list(range(i * per_image, (i + 1) * per_image)) for i in range(images)]
    txt2img = [i for i in range(images) for _ in range(per_image)]
    scores = rng.integers(0, 4, size=(images, images * per_image)).astype(float)  # many ties
    got = retrieval_metrics(scores, scores.T, img2txt, txt2img)
    want = brute_force(scores, scores.T, img2txt, txt2img)
    for key, value in want.items():
        assert got[key] == pytest.approx(value), key
    assert got["r_mean"] == pytest.approx((sum(want.values())) / 6)


def test_perfect_scores_and_chance():
    img2txt = [[0, 1], [2, 3]]
    txt2img = [0, 0, 1, 1]
    scores = np.array([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    metrics = retrieval_metrics(scores, scores.T, img2txt, txt2img)
    assert metrics["txt_r1"] == metrics["img_r1"] == metrics["r_mean"] == 100.0
    assert chance_r1(img2txt, 4) == pytest.approx(100 * (2 / 4 + 1 / 2) / 2)
