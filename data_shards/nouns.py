"""Nouns of captions by rule, for ViCHA's concept vocabulary: the head word of every noun phrase.

ViCHA takes object-noun heads from captions with ``sng_parser`` (spaCy's English model). Neither that model nor
any NLP package's tagger data installs here without a download, so this is a documented rule-based
extractor instead, good for the short descriptive English of captions:

1. The lower-cased caption is split into words (letters, with an inner apostrophe) and punctuation.
2. Function words end a phrase and belong to none: determiners, numbers, pronouns, prepositions,
   conjunctions, auxiliary verbs, common adverbs and the spatial words captions use as relations
   ("left", "right", "top", "middle"...); so does punctuation, and so does a word ending in "-ly".
3. A word of five letters or more ending in "-ing" or "-ed" (not "-eed") after the first word of a phrase,
   and followed by a function word, is taken for a verb and ends the phrase ("a man riding a horse",
   "a dog sitting on a bench": "man", "dog"); elsewhere it stays ("a tall building", "a parked car").
   This errs on a noun so placed ("a building on the left" gives "tall" for "a tall building on ...").
4. What remains are runs of content words ("large red circle"); the last word of each run is its head
   noun ("circle"), as the head of an English noun phrase comes last. "in orange" gives "orange".

Words keep their surface form, as ViCHA's heads do ("shapes" and "shape" are two concepts)::

    nouns("a large red circle left of two blue squares")   # ['circle', 'squares']
    vocabulary = noun_vocabulary(captions, min_count=2)   # nouns seen at least twice, most frequent first
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


DETERMINERS = _words(
    "a an the this that these those some any each every another other no either neither such what which whose "
    "my your his her its our their both all several many few more most much less least")
NUMBERS = _words(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen twenty thirty "
    "hundred dozen single first second third half")
PRONOUNS = _words(
    "i me you he him she it we us they them there here this someone something everyone everything nothing "
    "one ones itself themselves himself herself who whom")
PREPOSITIONS = _words(
    "of in on at with without by for from to into onto over under above below behind beside besides near next "
    "between through across along around inside outside up down off out against toward towards about like "
    "during upon among amongst beneath underneath within via per atop than as")
CONJUNCTIONS = _words(
    "and or but nor so yet while whereas if because although though when where")
AUXILIARIES = _words(
    "is are was were be been being am has have had having do does did can could will would shall should may "
    "might must 's isn't aren't wasn't don't doesn't")
ADVERBS = _words(
    "very not too also just only quite really rather almost nearly together again still even then now "
    "away back")
SPATIAL = _words(
    "left right top bottom middle center centre front side corner edge far close")
FUNCTION_WORDS = DETERMINERS | NUMBERS | PRONOUNS | PREPOSITIONS | CONJUNCTIONS | AUXILIARIES | ADVERBS | SPATIAL

_TOKEN = re.compile(r"[a-z]+(?:'[a-z]+)?|[0-9]+|[^\sa-z0-9]")


def nouns(caption: str) -> list[str]:
    """The head noun of every noun phrase of ``caption``, in order (see the module docstring)."""
    heads: list[str] = []
    run: list[str] = []

    def close() -> None:
        if run:
            heads.append(run[-1])
            run.clear()

    tokens = _TOKEN.findall(caption.lower())
    for index, token in enumerate(tokens):
        following = tokens[index + 1] if index + 1 < len(tokens) else ""
        ends_phrase = not token[0].isalpha() or token in FUNCTION_WORDS or token.endswith("ly")
        if ends_phrase or (run and _verb_like(token) and following in FUNCTION_WORDS):
            close()
        else:
            run.append(token)
    close()
    return heads


def _verb_like(word: str) -> bool:
    return len(word) >= 5 and (word.endswith("ing") or (word.endswith("ed") and not word.endswith("eed")))


def noun_counts(captions: Iterable[str]) -> Counter:
    """How often each noun occurs over ``captions`` (once per occurrence, as ViCHA's counter)."""
    counts: Counter = Counter()
    for caption in captions:
        counts.update(nouns(caption))
    return counts


def noun_vocabulary(captions: Iterable[str], min_count: int = 2) -> list[str]:
    """Nouns seen at least ``min_count`` times, most frequent first, ties alphabetical.

    ViCHA keeps nouns whose counter exceeds ``thresh``, its counter starting at 0 on the first sighting:
    ``thresh`` 0 is ``min_count`` 2 here, and CC3M's ``thresh`` 2 is ``min_count`` 4.
    """
    counts = noun_counts(captions)
    return [word for word, count in sorted(counts.items(), key=lambda item: (-item[1], item[0]))
            if count >= min_count]
