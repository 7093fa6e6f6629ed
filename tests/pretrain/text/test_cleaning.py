"""Tests of pretrain/text/cleaning.py: ALBEF's rules, the offset map, spans, markers kept through cleaning.

Equality with the implementation ALBEF ran before is in ``test_albef_identity.py``. CPU, under a second:
``pytest tests/pretrain/text/test_cleaning.py``.
"""

from __future__ import annotations

import random
import re

import pytest

from pretrain.text import pre_caption
from pretrain.text.cleaning import CleanedCaption, clean_caption
from pretrain.text.markers import MarkerSet

PEVL_MARKERS = ["@@", *(f"[pos_{index}]" for index in range(512)), "##"]


def test_pre_caption_rules():
    assert pre_caption("A Red-circle, left/of (the) <person>!!  ") == "a red circle left of the person"
    assert pre_caption("one two three four", max_words=2) == "one two"
    assert pre_caption("it's: a ~test~; #1?") == "its a test 1"


def test_offsets_point_at_the_characters_they_came_from():
    caption = "A  Red-circle, (left) of <PERSON>\tİx"
    cleaned = clean_caption(caption)
    assert cleaned.text == "a red circle left of person\ti̇x"
    assert cleaned.source_length == len(caption)
    # a _ red _ circle _ left _ of _ person \t i̇ x: collapsed runs keep their first offset, '-' becomes a
    # space in place, '<PERSON>' keeps its letters' offsets, 'İ' lowers to two characters with one offset.
    expected = [0, 1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 17, 18, 19, 21, 22, 23, 24, 26, 27, 28, 29, 30, 31, 33,
                34, 34, 35]
    assert list(cleaned.offsets) == expected


def test_offsets_of_random_captions_follow_the_rules():
    """Every kept character is its source lower-cased, or a space for '-', '/' or whitespace; offsets rise."""
    generator = random.Random(0)
    pool = [*"abcXYZ019,.'!?\"()*#:;~-/ \t\n", "  ", "<person>", "<PERSON>", "İ", "Σ", "ﬁ", "@@", "[pos_7]", "##"]
    for _ in range(500):
        caption = "".join(generator.choice(pool) for _ in range(generator.randrange(60)))
        for keep in ((), PEVL_MARKERS[:20] + PEVL_MARKERS[-1:]):
            cleaned = clean_caption(caption, max_words=generator.choice((3, 30)), keep=keep)
            assert len(cleaned.offsets) == len(cleaned.text)
            pairs = zip(cleaned.offsets, cleaned.offsets[1:], strict=False)
            assert all(a < b or (a == b and caption[a] == "İ") for a, b in pairs)
            for character, offset in zip(cleaned.text, cleaned.offsets, strict=True):
                source = caption[offset]
                if source in "-/" or source.isspace():
                    assert character == " " or character == source
                else:
                    # A marker's characters are its own; a final sigma lowers to 'ς'.
                    assert character in source.lower() or character in (source, "ς")


def test_span_maps_original_offsets_into_the_cleaned_text():
    caption = "A dog, (left) of the Red-Car!!! near <person>"
    cleaned = clean_caption(caption)
    assert cleaned.text == "a dog left of the red car near person"
    for word in ("dog", "left", "Red-Car", "near", "<person>"):
        start = caption.index(word)
        first, stop = cleaned.span(start, start + len(word))
        assert cleaned.text[first:stop] == pre_caption(word)
    assert cleaned.span(caption.index("!!!"), caption.index("!!!") + 3) is None  # removed entirely
    assert cleaned.span(3, 3) is None
    assert cleaned.span(0, len(caption)) == (0, len(cleaned.text))
    truncated = clean_caption(caption, max_words=3)
    assert truncated.text == "a dog left"
    assert truncated.span(caption.index("near"), caption.index("near") + 4) is None  # cut by max_words
    with pytest.raises(ValueError, match=r"\[40, 60\).*45 characters"):
        cleaned.span(40, 60)
    with pytest.raises(ValueError, match="before cleaning"):
        cleaned.span(5, 2)


def pevl_rule_clean(caption: str, max_words: int) -> str:
    """PEVL's own cleaning of captions with position tokens: ALBEF's rule that keeps '#'."""
    text = re.sub(r"[,.'!?\"()*:;~]", "", caption.lower()).replace("-", " ").replace("/", " ")
    text = re.sub(r"\s{2,}", " ", text.replace("<person>", "person")).strip()
    return " ".join(text.split(" ")[:max_words])


def test_markers_survive_cleaning_as_pevl_keeps_them():
    caption = "Two Dogs @@ [pos_12] [pos_40] [pos_100] [pos_511] ## (running) left-of a Man@@ [pos_1] [pos_2] [pos_3] "
    caption += "[pos_4] ##!"
    cleaned = clean_caption(caption, max_words=200, keep=PEVL_MARKERS)
    assert cleaned.text == pevl_rule_clean(caption, 200)
    assert cleaned.text.count("@@") == 2 and cleaned.text.count("##") == 2 and "[pos_511]" in cleaned.text
    # Without keep, ALBEF's rule deletes '#'.
    assert "##" not in clean_caption(caption, max_words=200).text
    # A marker keeps its own case and characters; the text around it is cleaned; stray '#' still goes.
    kept = clean_caption("A#B [UNUSED7] [unused7]! #", keep=("[UNUSED7]",))
    assert kept.text == "ab [UNUSED7] [unused7]"
    assert kept.offsets[3:12] == tuple(range(4, 13))


def test_markers_count_as_words_and_accept_a_prebuilt_marker_set():
    caption = "a dog @@ [pos_1] [pos_2] [pos_3] [pos_4] ## runs"
    markers = MarkerSet(PEVL_MARKERS)
    assert clean_caption(caption, max_words=4, keep=markers).text == "a dog @@ [pos_1]"
    assert clean_caption(caption, keep=markers) == clean_caption(caption, keep=PEVL_MARKERS)
    assert isinstance(clean_caption(caption), CleanedCaption)
