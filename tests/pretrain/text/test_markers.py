"""Tests of pretrain/text/markers.py: cutting texts at markers. CPU, instant:
``pytest tests/pretrain/text/test_markers.py``."""

from __future__ import annotations

import pickle
import random

import pytest

from pretrain.text.markers import MarkerSet


def brute_force_split(text: str, markers: set[str]) -> list[tuple[str, bool]]:
    """Leftmost, then longest, marker at each step, by trying every position and every marker."""
    pieces, plain, position = [], "", 0
    while position < len(text):
        matches = [marker for marker in markers if text.startswith(marker, position)]
        if matches:
            if plain:
                pieces.append((plain, False))
                plain = ""
            marker = max(matches, key=len)
            pieces.append((marker, True))
            position += len(marker)
        else:
            plain += text[position]
            position += 1
    if plain:
        pieces.append((plain, False))
    return pieces


def test_split_finds_markers_anywhere_and_prefers_the_longest():
    markers = MarkerSet(["@@", "##", "[pos_1]", "[pos_12]", "#"])
    assert markers.split("dog@@ [pos_12][pos_1]###x") == [
        ("dog", False), ("@@", True), (" ", False), ("[pos_12]", True), ("[pos_1]", True), ("##", True), ("#", True),
        ("x", False),
    ]
    assert markers.split("") == []
    assert markers.split("[pos_1") == [("[pos_1", False)]
    assert MarkerSet().split("a ## b") == [("a ## b", False)]
    assert len(markers) == 5 and "@@" in markers and "@" not in markers


def test_split_equals_a_brute_force_search_and_joins_back():
    generator = random.Random(0)
    marker_list = ["@@", "##", "#", "[pos_1]", "[pos_12]", "[a]", "ab", "abc"]
    markers = MarkerSet(marker_list)
    pool = list("ab#@[]_cpos12 ") + ["[pos_1]", "[pos_12]"]
    for _ in range(2000):
        text = "".join(generator.choice(pool) for _ in range(generator.randrange(30)))
        pieces = markers.split(text)
        assert pieces == brute_force_split(text, set(marker_list))
        assert "".join(piece for piece, _ in pieces) == text


def test_markers_must_be_non_empty_without_whitespace_and_pickle():
    with pytest.raises(ValueError, match="'a b' contains whitespace"):
        MarkerSet(["@@", "a b"])
    with pytest.raises(ValueError, match="non-empty string"):
        MarkerSet([""])
    markers = pickle.loads(pickle.dumps(MarkerSet(["@@", "[pos_3]"])))
    assert markers.split("x@@[pos_3]") == [("x", False), ("@@", True), ("[pos_3]", True)]
