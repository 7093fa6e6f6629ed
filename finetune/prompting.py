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
from pretrain.text.positions import FIRST_UNUSED

WORD_EMBEDDINGS = "text_encoder.bert.embeddings.word_embeddings.weight"


@dataclass(frozen=True)
class Candidate:
    """One answer: ``tokens`` as ``(slot, token id)`` pairs that are scored, ``length`` its normaliser."""

    tokens: tuple[tuple[int, int], ...]
    length: int


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
