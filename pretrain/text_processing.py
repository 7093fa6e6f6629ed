"""Caption cleaning (ALBEF's ``pre_caption``) and batch tokenisation run inside loader workers.

``TokenizeBatch(tokenizer, max_words=30)`` is a picklable callable that the data loader applies to
each collated batch: it cleans ``batch["text"]`` and adds ``input_ids`` and ``attention_mask``, so the
training step receives tensors and never tokenises.
"""

from __future__ import annotations

import re

_DELETED = re.compile(r"[,.'!?\"()*#:;~]")
_SPACED = re.compile(r"[-/]")
_SPACES = re.compile(r"\s{2,}")


def pre_caption(caption: str, max_words: int = 30) -> str:
    """Lower-case; delete , . ' ! ? " ( ) * # : ; ~; '-' and '/' become spaces; <person> -> person;
    collapse whitespace; keep the first ``max_words`` words (reference/albef.md section 4)."""
    text = caption.lower().replace("<person>", "person")
    text = _SPACED.sub(" ", _DELETED.sub("", text))
    text = _SPACES.sub(" ", text).strip()
    words = text.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else text


class TokenizeBatch:
    """batch -> batch with cleaned ``text`` plus ``input_ids`` / ``attention_mask`` tensors."""

    def __init__(self, tokenizer, max_words: int = 30):
        self.tokenizer = tokenizer
        self.max_words = max_words

    def __call__(self, batch: dict) -> dict:
        texts = [pre_caption(text, self.max_words) for text in batch["text"]]
        tokens = self.tokenizer(texts)
        return {**batch, "text": texts, "input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}
