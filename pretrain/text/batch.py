"""Cleaning and tokenising a whole batch inside the loader workers.

``TokenizeBatch(tokenizer, max_words=30)`` is a picklable callable that the data loader applies to
each collated batch: it cleans ``batch["text"]`` (ALBEF's rules, keeping the tokenizer's extra tokens)
and adds ``input_ids`` and ``attention_mask``, so the training step receives tensors and never
tokenises::

    loader = StreamingLoader(..., postprocess=TokenizeBatch(build_tokenizer(bert_dir, max_length=30)))
"""

from __future__ import annotations

from pretrain.text.cleaning import clean_caption
from pretrain.text.tokenizer import TextTokenizer


class TokenizeBatch:
    """batch -> batch with cleaned ``text`` plus ``input_ids`` / ``attention_mask`` tensors."""

    def __init__(self, tokenizer: TextTokenizer, max_words: int = 30):
        self.tokenizer = tokenizer
        self.max_words = max_words

    def __call__(self, batch: dict) -> dict:
        keep = self.tokenizer.markers  # empty without extra tokens: exactly pre_caption
        texts = [clean_caption(text, self.max_words, keep=keep).text for text in batch["text"]]
        tokens = self.tokenizer(texts)
        return {**batch, "text": texts, "input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}
