"""The batch tokenizer: texts -> padded ``input_ids`` / ``attention_mask``, with optional extra tokens.

``build_tokenizer`` reads a LOCAL BERT directory (vocab.txt / tokenizer.json; never downloads) and
wraps its Hugging Face tokenizer as a ``TextTokenizer``::

    tokenizer = build_tokenizer("bert-base-uncased/", max_length=30)         # ALBEF: [CLS] x, no [SEP]
    batch = tokenizer(["a dog on a red mat", "a cat"])                       # {"input_ids", "attention_mask"}

    pevl = build_tokenizer("bert-base-uncased/", max_length=40, extra_tokens=pevl_position_tokens())
    pevl(["a dog @@ [pos_3] [pos_9] [pos_80] [pos_99] ## runs"])             # each marker is one id
    pevl.token_id("[pos_3]"), pevl.group_ids("position"), pevl.vocab_size

Extra tokens (``pretrain.text.extra_tokens``) are never split: the text is cut at them, the pieces
between go through the Hugging Face tokenizer and each extra token becomes its own id. Without extra
tokens the tokenizer is called on the texts as they are.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from transformers import AutoTokenizer

from pretrain.text.extra_tokens import ExtraTokenGroup, resolve_extra_tokens
from pretrain.text.markers import MarkerSet


class TextTokenizer:
    """Batch tokenizer: texts -> ``input_ids`` and ``attention_mask`` LongTensors ``[B, T]``, padded to the longest.

    ALBEF convention (``trailing_sep=False``): ``[CLS] x`` with no trailing ``[SEP]``, as the released
    ALBEF checkpoints were trained; ``trailing_sep=True`` gives the standard ``[CLS] x [SEP]``. Either way
    a sequence has at most ``max_length`` ids, special tokens included. ``extra_tokens`` lists groups of
    ``MappedTokens`` / ``AppendedTokens``. Picklable, for loader workers.
    """

    def __init__(
        self, tokenizer, max_length: int, trailing_sep: bool = False, extra_tokens: Sequence[ExtraTokenGroup] = ()
    ):
        num_special = 2 if trailing_sep else 1
        if max_length <= num_special:
            raise ValueError(f"max_length {max_length} leaves no room for text after {num_special} special token(s)")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.trailing_sep = trailing_sep
        self.extra_tokens = tuple(extra_tokens)
        vocabulary = tokenizer.get_vocab() if self.extra_tokens else {}
        self._extra = resolve_extra_tokens(self.extra_tokens, vocabulary, len(tokenizer))
        self.markers = MarkerSet(self._extra.ids)  # what cleaning must keep: clean_caption(..., keep=markers)

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def cls_token_id(self) -> int:
        return self.tokenizer.cls_token_id

    @property
    def sep_token_id(self) -> int:
        return self.tokenizer.sep_token_id

    @property
    def mask_token_id(self) -> int:
        return self.tokenizer.mask_token_id

    @property
    def vocab_size(self) -> int:
        """Ids the embedding table must cover: the tokenizer's, its added tokens and appended extra tokens."""
        return len(self.tokenizer) + self._extra.appended

    def token_id(self, token: str) -> int:
        """The id of an extra token or of a whole token of the vocabulary (``"[MASK]"``, ``"dog"``)."""
        if token in self._extra.ids:
            return self._extra.ids[token]
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id == self.tokenizer.unk_token_id and token != self.tokenizer.unk_token:
            raise KeyError(f"{token!r} is neither an extra token nor a token of the vocabulary")
        return token_id

    def group_ids(self, group: str) -> range:
        """The ids of an extra-token group, in the order its tokens were listed."""
        if group not in self._extra.groups:
            raise KeyError(f"no extra-token group {group!r}; this tokenizer has {sorted(self._extra.groups)}")
        return self._extra.groups[group]

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        if isinstance(texts, str) or not texts:
            raise TypeError("TextTokenizer takes a non-empty list of strings")
        suffix = [self.sep_token_id] if self.trailing_sep else []
        room = self.max_length - 1 - len(suffix)
        if self.markers:
            pieces = self._ids_around_extra_tokens(texts, room)
        else:
            pieces = self._plain_ids(list(texts), room)
        rows = [[self.cls_token_id, *ids, *suffix] for ids in pieces]
        longest = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for index, row in enumerate(rows):
            input_ids[index, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[index, : len(row)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def _plain_ids(self, texts: list[str], room: int) -> list[list[int]]:
        """Word-piece ids of each text, no special tokens, at most ``room`` each."""
        return self.tokenizer(texts, add_special_tokens=False, truncation=True, max_length=room)["input_ids"]

    def _ids_around_extra_tokens(self, texts: list[str], room: int) -> list[list[int]]:
        """Each text's ids, at most ``room``: plain pieces through the tokenizer (one batched call), markers by id."""
        split_texts = [self.markers.split(text) for text in texts]
        plain = [piece for pieces in split_texts for piece, is_marker in pieces if not is_marker]
        # Truncating each piece to the room changes nothing that the final cut would keep.
        plain_ids = iter(self._plain_ids(plain, room) if plain else ())
        rows = []
        for pieces in split_texts:
            ids = []
            for piece, is_marker in pieces:
                ids.extend([self._extra.ids[piece]] if is_marker else next(plain_ids))
            rows.append(ids[:room])
        return rows


def build_tokenizer(
    bert_dir: str, *, max_length: int, trailing_sep: bool = False, extra_tokens: Sequence[ExtraTokenGroup] = ()
) -> TextTokenizer:
    """The tokenizer of a LOCAL BERT directory (vocab.txt / tokenizer.json), wrapped as a ``TextTokenizer``."""
    if not os.path.isdir(bert_dir):
        raise FileNotFoundError(
            f"BERT directory {bert_dir!r} does not exist; the tokenizer is read from a LOCAL directory "
            "(vocab.txt or tokenizer.json), never downloaded"
        )
    tokenizer = AutoTokenizer.from_pretrained(bert_dir, local_files_only=True)
    return TextTokenizer(tokenizer, max_length=max_length, trailing_sep=trailing_sep, extra_tokens=extra_tokens)
