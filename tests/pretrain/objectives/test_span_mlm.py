"""Tests for pretrain/objectives/span_mlm.py: X-VLM's span and whole-word masking against a transcription of its
masking generator on token strings (same random draws, same result), its counts on a big batch, and the loss
against cross-entropy over the full vocabulary logits.

Run: ``.venv/bin/python -m pytest -q tests/pretrain/objectives/test_span_mlm.py``.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from pretrain.objectives.span_mlm import (
    MaskingVocabulary,
    SpanMLMConfig,
    masked_lm_loss,
    span_mask,
    span_mask_batch,
)

# A toy word-piece vocabulary: id -> token; "##" pieces continue the word before them.
TOKENS = ["[PAD]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle", "sq", "##ua", "##re", "left", "of", "tri",
          "##angle", "blue", "big", "##gest", "the", "on", "green"]
IDS = {token: index for index, token in enumerate(TOKENS)}
VOCABULARY = MaskingVocabulary(size=len(TOKENS), mask_id=IDS["[MASK]"],
                               continuation=frozenset(i for i, t in enumerate(TOKENS) if t.startswith("##")))


def reference_masking(tokens: list[str], mask_prob, mask_max, skipgram_prb, skipgram_size, whole_word,
                      rng: random.Random) -> tuple[list[str], list[int]]:
    """X-VLM's TextMaskingGenerator.__call__ as its definition reads, on token strings ([CLS] first)."""
    n_pred = min(mask_max, max(1, int(round(len(tokens) * mask_prob))))
    special_pos = {0}
    cand_pos = list(range(1, len(tokens)))
    rng.shuffle(cand_pos)
    masked_pos = set()
    max_cand_pos = max(cand_pos)
    for pos in cand_pos:
        if len(masked_pos) >= n_pred:
            break
        if pos in masked_pos:
            continue

        def expand(st, end):
            while st >= 0 and tokens[st].startswith("##"):
                st -= 1
            while end < len(tokens) and tokens[end].startswith("##"):
                end += 1
            return st, end

        if skipgram_prb > 0 and skipgram_size >= 2 and rng.random() < skipgram_prb:
            size = rng.randint(2, skipgram_size)
            st_pos, end_pos = expand(pos, pos + size) if whole_word else (pos, pos + size)
        else:
            st_pos, end_pos = expand(pos, pos + 1) if whole_word else (pos, pos + 1)
        for mp in range(st_pos, end_pos):
            if 0 < mp <= max_cand_pos and mp not in special_pos:
                masked_pos.add(mp)
            else:
                break
    masked_pos = list(masked_pos)
    if len(masked_pos) > n_pred:
        rng.shuffle(masked_pos)
        masked_pos = masked_pos[:n_pred]
    tokens = list(tokens)
    for pos in masked_pos:
        if rng.random() < 0.8:
            tokens[pos] = "[MASK]"
        elif rng.random() < 0.5:
            tokens[pos] = TOKENS[rng.randint(0, len(TOKENS) - 1)]
    return tokens, masked_pos


def random_text(rng: random.Random) -> list[str]:
    words = [["a"], ["red"], ["circle"], ["sq", "##ua", "##re"], ["left"], ["of"], ["tri", "##angle"], ["blue"],
             ["big", "##gest"], ["the"], ["on"], ["green"]]
    tokens = ["[CLS]"]
    for _ in range(rng.randint(1, 12)):
        tokens += rng.choice(words)
    return tokens


@pytest.mark.parametrize("config", [SpanMLMConfig(), SpanMLMConfig(probability=0.5, max_masks=3, span_probability=0.6),
                                    SpanMLMConfig(whole_word=False, span_probability=1.0, max_span=4),
                                    SpanMLMConfig(span_probability=0.0)])
def test_masking_matches_x_vlms_generator_draw_for_draw(config):
    texts = random.Random(0)
    for seed in range(300):
        tokens = random_text(texts)
        expected_tokens, expected_positions = reference_masking(
            tokens, config.probability, config.max_masks, config.span_probability, config.max_span,
            config.whole_word, random.Random(seed))
        masked, positions = span_mask([IDS[t] for t in tokens], config, VOCABULARY, random.Random(seed))
        assert positions == expected_positions
        assert [TOKENS[i] for i in masked] == expected_tokens


def test_whole_words_spans_and_the_cap_on_a_big_batch():
    rng = random.Random(1)
    rows = [[IDS[t] for t in random_text(rng)] for _ in range(2000)]
    length = max(map(len, rows))
    input_ids = torch.tensor([row + [0] * (length - len(row)) for row in rows])
    attention_mask = (torch.arange(length)[None] < torch.tensor([len(r) for r in rows])[:, None]).long()
    config = SpanMLMConfig()
    masked_ids, labels = span_mask_batch(input_ids, attention_mask, config, VOCABULARY, random.Random(2))
    chosen = labels != -100
    assert torch.equal(labels[chosen], input_ids[chosen]) and not chosen[:, 0].any()
    assert not (chosen & (attention_mask == 0)).any() and torch.equal(masked_ids[~chosen], input_ids[~chosen])
    counts = chosen.sum(dim=1)
    expected = torch.tensor([min(8, max(1, round(len(r) * 0.25))) for r in rows])
    assert bool((counts <= expected).all()) and float((counts == expected).float().mean()) > 0.9
    # a chosen word piece comes with the token before it far more often than without whole-word masking (not
    # always: the cap keeps a random subset of the positions taken)
    pieces = torch.isin(input_ids, torch.tensor(sorted(VOCABULARY.continuation)))

    def with_token_before(labels_: torch.Tensor) -> float:
        chosen_ = labels_ != -100
        return float(torch.roll(chosen_, 1, dims=1)[chosen_ & pieces].float().mean())

    parts = span_mask_batch(input_ids, attention_mask, SpanMLMConfig(whole_word=False, span_probability=0.0),
                            VOCABULARY, random.Random(2))[1]
    assert with_token_before(labels) > 0.7 and with_token_before(parts) < 0.4
    share = (masked_ids[chosen] == VOCABULARY.mask_id).float().mean()
    assert abs(float(share) - 0.8 - 0.2 * 0.5 / len(TOKENS)) < 0.02


def test_the_loss_is_cross_entropy_over_the_masked_positions_of_the_full_logits():
    torch.manual_seed(0)

    class TinyText(torch.nn.Module):
        """The two calls masked_lm_loss makes of a text encoder, on random weights."""

        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(len(TOKENS), 8)
            self.head = torch.nn.Linear(8, len(TOKENS))

        def forward(self, ids, mask, image, image_mask=None):
            return self.embed(ids) + image.mean(dim=1, keepdim=True)

        def mlm_logits(self, hidden):
            return self.head(hidden)

    text = TinyText()
    ids = torch.randint(4, len(TOKENS), (3, 6))
    labels = torch.full_like(ids, -100)
    labels[0, 2], labels[2, 1], labels[2, 5] = 7, 9, 4
    image = torch.randn(3, 5, 8)
    loss = masked_lm_loss(text, ids, torch.ones_like(ids), labels, image)
    full = text.mlm_logits(text(ids, None, image))
    expected = F.cross_entropy(full.reshape(-1, len(TOKENS)), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, expected)
    nothing = masked_lm_loss(text, ids, torch.ones_like(ids), torch.full_like(ids, -100), image)
    assert nothing.item() == 0.0 and nothing.requires_grad
