"""What PEVL's prompt-tuned tasks share: the backbone's MLM head read at masked slots, candidate ranking by
length-normalised log-probability, and loading a checkpoint with PEVL's position tokens checked.

Every PEVL task (``prompt_grounding``, ``vrd``, ``gqa``) writes its question as text with ``[MASK]`` slots and
reads the answer from the MLM head at those slots, one non-autoregressive step::

    logits = slot_logits(model, images, input_ids, attention_mask, slots)      # [B, S, V] at slots [B, S]
    scores = rank_candidates(logits.log_softmax(-1), candidates)                # [B, C]

A candidate is a list of ``(slot, token id)`` pairs and a length: its score is the sum of the token
log-probabilities over its length (PEVL's ``run_vrd_train.py`` and GQA evaluation; padding slots such as VRD's
second and third ``[unrel]`` or GQA's ``[PAD]`` are not scored, but the length they belong to is PEVL's word or
token count).

``backbone_with_positions`` is the ``backbone_to_task`` hook of these tasks (``finetune.loop.load_weights``):
it puts a pretraining checkpoint's backbone under ``model.``, drops what a released PEVL file has besides
(``pretrain.importers.pevl``), and checks that the tokenizer gives PEVL's position-token ids and that the
embeddings reach them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from pretrain.importers.pevl import UNUSED_QUEUES, check_position_token_ids
from pretrain.text.cleaning import clean_caption
from pretrain.text.pevl_batch import MAX_WORDS
from pretrain.text.positions import FIRST_UNUSED

WORD_EMBEDDINGS = "text_encoder.bert.embeddings.word_embeddings.weight"


@dataclass(frozen=True)
class Candidate:
    """One answer: ``tokens`` as ``(slot, token id)`` pairs that are scored, ``length`` its normaliser."""

    tokens: tuple[tuple[int, int], ...]
    length: int


def assemble(tokenizer, rows: Sequence[Sequence[str | tuple[int, ...]]]) -> tuple[dict, list[list[int]]]:
    """Token rows from pieces: a ``str`` is text (cleaned with the markers kept, then tokenised), a tuple of ids is
    written as it is (``[SEP]``, ``[MASK]`` slots, which cleaning would lower-case). Each row is ``[CLS]`` and its
    pieces, padded to the longest; a row over ``tokenizer.max_length`` loses text from the end of its first text
    piece, then the next, never ids. Returns the batch and, per row, the column where each piece starts."""
    texts = [clean_caption(piece, MAX_WORDS, keep=tokenizer.markers).text
             for row in rows for piece in row if isinstance(piece, str)]
    text_ids = iter([])
    if texts:
        encoded = tokenizer(texts)
        trailing = 1 if tokenizer.trailing_sep else 0  # pieces carry neither [CLS] nor a trailing [SEP]
        text_ids = iter([ids[1:int(mask.sum()) - trailing].tolist()
                         for ids, mask in zip(encoded["input_ids"], encoded["attention_mask"], strict=True)])
    assembled, starts = [], []
    for row in rows:
        pieces = [next(text_ids) if isinstance(piece, str) else list(piece) for piece in row]
        excess = 1 + sum(map(len, pieces)) - tokenizer.max_length
        for index, piece in enumerate(row):
            if excess <= 0:
                break
            if isinstance(piece, str):
                cut = min(excess, len(pieces[index]))
                pieces[index] = pieces[index][: len(pieces[index]) - cut]
                excess -= cut
        if excess > 0:
            raise ValueError(f"a prompt's fixed tokens need {tokenizer.max_length + excess} positions; raise "
                             f"model.max_text_length above {tokenizer.max_length}")
        offsets, column = [], 1
        for piece in pieces:
            offsets.append(column)
            column += len(piece)
        assembled.append([tokenizer.cls_token_id, *(token for piece in pieces for token in piece)])
        starts.append(offsets)
    longest = max(map(len, assembled))
    input_ids = torch.full((len(assembled), longest), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(assembled), longest), dtype=torch.long)
    for index, ids in enumerate(assembled):
        input_ids[index, : len(ids)] = torch.tensor(ids)
        attention_mask[index, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}, starts


def slot_logits(model, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                slots: torch.Tensor) -> torch.Tensor:
    """MLM logits ``[B, S, V]`` at the columns ``slots`` ``[B, S]`` of each row, the fusion layers reading the
    image; the head runs on those S positions only."""
    image_tokens, _ = model.image_embeddings(images.to(model.vision_proj.weight.dtype))
    hidden = model.text_encoder(input_ids, attention_mask, image_tokens)
    picked = hidden.gather(1, slots[..., None].expand(-1, -1, hidden.shape[-1]))
    return model.text_encoder.mlm_logits(picked)


def rank_candidates(log_probabilities: torch.Tensor, candidates: Sequence[Candidate]) -> torch.Tensor:
    """``[B, C]`` scores: for each row and candidate, the sum of its tokens' log-probabilities over its length."""
    rows = log_probabilities.shape[0]
    scores = torch.zeros(rows, len(candidates), dtype=torch.float32, device=log_probabilities.device)
    for index, candidate in enumerate(candidates):
        if candidate.length <= 0:
            raise ValueError(f"candidate {index} has length {candidate.length}; it must be positive")
        total = torch.zeros(rows, dtype=torch.float32, device=log_probabilities.device)
        for slot, token in candidate.tokens:
            total = total + log_probabilities[:, slot, token].float()
        scores[:, index] = total / candidate.length
    return scores


def freeze(*modules: nn.Module | nn.Parameter) -> None:
    """Heads a prompt task does not train (ITM, projections): no gradient, no optimizer state."""
    for module in modules:
        module.requires_grad_(False)


def backbone_with_positions(state: dict[str, torch.Tensor], tokenizer, *, unrelated: bool = False,
                            num_bins: int = 512, first_unused: int = FIRST_UNUSED) -> dict[str, torch.Tensor]:
    """A pretraining backbone state (our names) as the task's ``model.*`` keys, PEVL's extras dropped and the
    position-token ids checked (see the module docstring)."""
    state = {name: value for name, value in state.items() if name not in UNUSED_QUEUES}
    if WORD_EMBEDDINGS in state:
        check_position_token_ids(tokenizer, state[WORD_EMBEDDINGS], num_bins=num_bins, first_unused=first_unused,
                                 unrelated=unrelated)
    return {f"model.{name}": value for name, value in state.items()}
