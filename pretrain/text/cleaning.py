"""Caption cleaning (ALBEF's rules) that keeps a character offset map and leaves chosen markers intact.

``clean_caption`` applies ALBEF's ``pre_caption`` rules and records, for every character it keeps,
where it stood in the original caption, so region spans given in the original's character offsets
(X-VLM phrases, PEVL ``tokens_positive``, MVPTR phrases) can be found in the cleaned text; markers in
``keep`` (PEVL's ``@@`` / ``##`` / ``[pos_N]``, extra tokens of the tokenizer) pass through unchanged::

    cleaned = clean_caption("A dog, left of @@ [pos_1] ##!", keep=("@@", "##", "[pos_1]"))
    cleaned.text            # 'a dog left of @@ [pos_1] ##'
    cleaned.offsets[2]      # 2: cleaned character 2 ('d') is character 2 of the caption
    cleaned.span(2, 6)      # (2, 5): caption[2:6] ('dog,') is cleaned.text[2:5] ('dog')

``pre_caption(caption, max_words)`` is the cleaned text alone, with no markers: exactly the strings
this project has always fed ALBEF.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from collections.abc import Iterable
from dataclasses import dataclass

from pretrain.text.markers import MarkerSet

DELETED_CHARACTERS = frozenset(",.'!?\"()*#:;~")
SPACED_CHARACTERS = frozenset("-/")
PERSON_TAG = "<person>"  # Flickr30k's placeholder for a person, read as the word
_WHITESPACE_RUN = re.compile(r"\s{2,}")
_SPACES_FOR = str.maketrans(dict.fromkeys(SPACED_CHARACTERS, " "))


@dataclass(frozen=True)
class CleanedCaption:
    """A cleaned caption: ``text``, and ``offsets[i]`` = the index in the original caption of ``text[i]``.

    Offsets never decrease. ``source_length`` is the original caption's length.
    """

    text: str
    offsets: tuple[int, ...]
    source_length: int

    def span(self, start: int, end: int) -> tuple[int, int] | None:
        """Where the original caption's ``[start, end)`` lies in ``text``, as ``(start, end)``; None if all of it
        was removed (punctuation only, cut by ``max_words``) or the span is empty."""
        if not 0 <= start <= end <= self.source_length:
            raise ValueError(
                f"span [{start}, {end}) does not fit the original caption of {self.source_length} characters; "
                "spans are character offsets into the caption before cleaning"
            )
        first, stop = bisect_left(self.offsets, start), bisect_left(self.offsets, end)
        return (first, stop) if first < stop else None


def clean_caption(caption: str, max_words: int = 30, keep: Iterable[str] | MarkerSet = ()) -> CleanedCaption:
    """ALBEF's cleaning with an offset map; the markers in ``keep`` survive untouched and count as words.

    Lower-case; delete , . ' ! ? " ( ) * # : ; ~; '-' and '/' become spaces; ``<person>`` -> person;
    runs of two or more whitespace characters become one space; strip; keep the first ``max_words``
    space-separated words. Outside markers, the text is cleaned exactly as ``pre_caption`` cleans it. For
    many captions, pass ``keep`` as one ``MarkerSet`` (a tokenizer's ``markers``) instead of building it
    on every call.
    """
    markers = keep if isinstance(keep, MarkerSet) else MarkerSet(keep)
    texts, offsets = [], []
    position = 0
    for piece, is_marker in markers.split(caption):
        if is_marker:
            text, piece_offsets = piece, range(position, position + len(piece))
        else:
            text, piece_offsets = _clean_characters(piece, position)
        texts.append(text)
        offsets.extend(piece_offsets)
        position += len(piece)
    # Markers hold no whitespace, so the whitespace and word steps below never touch them.
    text, offsets = _collapse_whitespace("".join(texts), offsets)
    text, offsets = _strip(text, offsets)
    text = _first_words(text, max_words)
    return CleanedCaption(text=text, offsets=tuple(offsets[: len(text)]), source_length=len(caption))


def pre_caption(caption: str, max_words: int = 30) -> str:
    """ALBEF's caption cleaning (reference/albef.md section 4): ``clean_caption(caption, max_words).text``."""
    return clean_caption(caption, max_words).text


def _clean_characters(piece: str, start: int) -> tuple[str, list[int]]:
    """The character-wise rules on a piece that holds no marker: lower-case, ``<person>``, deletions, spaces."""
    lowered = piece.lower()
    # Lower-casing the whole piece (not character by character) keeps Python's context rule for a final
    # sigma. Each character still lowers to a fixed number of characters (only 'İ' gives two), so the
    # offsets follow from the characters one by one.
    if len(lowered) == len(piece):
        offsets = list(range(start, start + len(piece)))
    else:
        offsets = [start + index for index, character in enumerate(piece) for _ in range(len(character.lower()))]
    text, offsets = _replace_person_tags(lowered, offsets)
    kept = [index for index, character in enumerate(text) if character not in DELETED_CHARACTERS]
    kept_text = "".join([text[index] for index in kept]).translate(_SPACES_FOR)
    return kept_text, [offsets[index] for index in kept]


def _replace_person_tags(text: str, offsets: list[int]) -> tuple[str, list[int]]:
    """``str.replace(PERSON_TAG, "person")``, the letters keeping their own offsets."""
    if PERSON_TAG not in text:
        return text, offsets
    new_text, new_offsets = [], []
    position = 0
    while (found := text.find(PERSON_TAG, position)) >= 0:
        new_text.append(text[position:found] + PERSON_TAG[1:-1])
        new_offsets.extend(offsets[position:found])
        new_offsets.extend(offsets[found + 1 : found + len(PERSON_TAG) - 1])
        position = found + len(PERSON_TAG)
    new_text.append(text[position:])
    new_offsets.extend(offsets[position:])
    return "".join(new_text), new_offsets


def _collapse_whitespace(text: str, offsets: list[int]) -> tuple[str, list[int]]:
    """Every run of two or more whitespace characters -> one space at the run's first offset.

    A single whitespace character (a lone tab or newline) stays as it is, as in ALBEF's rule.
    """
    new_text, new_offsets = [], []
    position = 0
    for run in _WHITESPACE_RUN.finditer(text):
        new_text.append(text[position : run.start()] + " ")
        new_offsets.extend(offsets[position : run.start() + 1])
        position = run.end()
    new_text.append(text[position:])
    new_offsets.extend(offsets[position:])
    return "".join(new_text), new_offsets


def _strip(text: str, offsets: list[int]) -> tuple[str, list[int]]:
    stripped = text.strip()
    start = len(text) - len(text.lstrip())
    return stripped, offsets[start : start + len(stripped)]


def _first_words(text: str, max_words: int) -> str:
    """The first ``max_words`` words, split on single spaces (a list slice, as ALBEF's rule takes it)."""
    words = text.split(" ")
    if len(words) <= max_words:
        return text
    # Joining a prefix of the words gives a prefix of the text, so the offsets are cut to its length.
    return " ".join(words[:max_words])
