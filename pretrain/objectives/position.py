"""PEVL's generalised MLM: position tokens masked by groups, and the order-aware soft position loss.

Masking (``mask_with_positions``, PEVL ``model_pretrain.py``'s ``mask``), in this order of draws:

1. Text tokens are chosen with probability ``probability`` (Bernoulli), except PAD, CLS and the position
   tokens ``[pos_0]``..``[pos_511]``. ``@@`` and ``##`` are ordinary tokens here: PEVL excludes only the bins.
2. ``grouped``: for every ``@@``, k of the (up to) 4 position tokens that follow it are chosen, k uniform
   over 1..4 (fewer when the caption was cut inside the group), without replacement. ``all``: every
   position token is chosen (PEVL's second stage and prompt tuning).
3. Chosen tokens become ``[MASK]`` with probability 0.8, else a random id (uniform over the vocabulary) with
   probability 0.5, else stay; in ``all`` mode the position tokens always become ``[MASK]``, as PEVL's
   ``postoken_mask``. ``labels`` hold the original id at chosen positions, -100 elsewhere.

The soft position loss (``soft_position_loss``): for a chosen position token of bin i the target over the
bins is ``q_j = exp(-decay * |i - j|) / sum_k exp(-decay * |i - k|)`` (``soft_position_targets``); the loss is
``-sum_j q_j log p_j`` averaged over those tokens, where ``p`` is the softmax over the whole vocabulary read on
the position slice (``normalisation: vocabulary``, what PEVL's code computes; the targets are zero outside the
slice) or the softmax over the position slice alone (``normalisation: positions``). The objective scales it by
``soft_weight`` (PEVL's ``postoken_temp``, 2). PEVL's decay (``exp_decay_ratio``) is 0.15 for grounding and
0.25 for VRD, VCR and GQA.

``PositionMLM`` (``objectives.position_mlm``) returns ``mlm`` (ALBEF's CE with momentum distillation over
every chosen token, text and position; ``pretrain.objectives.mlm.mlm_loss``) and ``soft``. With ``mlm: false``
only ``soft`` is returned (PEVL's second stage: ITC + ITM + soft). PEVL's own MLM distillation takes its
log-softmax over the sequence axis (ALBEF's pre-b726f8e bug); ``mlm_loss`` takes it over the vocabulary.

Tests: ``.venv/bin/python -m pytest -q tests/pretrain/objectives/test_position.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pretrain.config import require, require_choice
from pretrain.models.encoded import Encoded
from pretrain.objectives.base import BuildContext, Needs, Objective, StepContext
from pretrain.objectives.mlm import IGNORE_INDEX, mlm_loss
from pretrain.text.positions import BOX_OPEN, FIRST_UNUSED, NUM_BINS, with_position_tokens

MASKINGS = ("grouped", "all")
NORMALISATIONS = ("vocabulary", "positions")
EMBEDDING_INITS = ("keep", "sinusoidal")
GROUP_SIZE = 4  # x1, y1, x2, y2


def soft_position_targets(num_bins: int, decay: float) -> torch.Tensor:
    """``[num_bins, num_bins]``: row i is the soft target of a token of bin i (float64 sums, float32 values)."""
    bins = torch.arange(num_bins, dtype=torch.float64)
    weights = torch.exp(-decay * (bins[:, None] - bins[None, :]).abs())
    return (weights / weights.sum(dim=1, keepdim=True)).float()


def sinusoidal_position_embeddings(num_bins: int, width: int, norm: float) -> torch.Tensor:
    """``[num_bins, width]``: bin i's vector of sines and cosines of i at geometric frequencies (the transformer's
    position encoding over the bins), each row scaled to ``norm``. Neighbouring bins get close vectors."""
    bins = torch.arange(num_bins, dtype=torch.float64)[:, None]
    frequencies = torch.exp(-math.log(10000.0) * torch.arange(0, width, 2, dtype=torch.float64) / width)
    table = torch.zeros(num_bins, width, dtype=torch.float64)
    table[:, 0::2] = torch.sin(bins * frequencies)
    table[:, 1::2] = torch.cos(bins * frequencies[: width // 2])
    return (table / table.norm(dim=1, keepdim=True) * norm).float()


def _is_position(input_ids: torch.Tensor, positions: range) -> torch.Tensor:
    return (input_ids >= positions.start) & (input_ids < positions.stop)


def choose_position_groups(input_ids: torch.Tensor, box_open_id: int, positions: range,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """bool like ``input_ids``: for each ``@@``, k of the position tokens right after it (k uniform over 1..4)."""
    chosen = torch.zeros_like(input_ids, dtype=torch.bool)
    is_position = _is_position(input_ids, positions)
    for row, column in (input_ids == box_open_id).nonzero().tolist():
        group = []
        for offset in range(1, GROUP_SIZE + 1):
            if column + offset >= input_ids.shape[1] or not is_position[row, column + offset]:
                break
            group.append(column + offset)
        wanted = int(torch.randint(1, GROUP_SIZE + 1, (1,), generator=generator))
        if not group:
            continue
        picks = torch.randperm(len(group), generator=generator)[: min(wanted, len(group))]
        chosen[row, [group[index] for index in picks.tolist()]] = True
    return chosen


def mask_with_positions(input_ids: torch.Tensor, *, positions: range, box_open_id: int, vocab_size: int,
                        mask_token_id: int, pad_token_id: int, cls_token_id: int, probability: float = 0.15,
                        masking: str = "grouped",
                        generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(masked_ids, labels)`` by PEVL's rule (module docstring); ``input_ids`` is not modified. On CPU ids
    (as the loader and tests have them) the draws follow ``generator``; on a GPU pass a generator there."""
    if masking not in MASKINGS:
        raise ValueError(f"position masking {masking!r}: use one of {', '.join(MASKINGS)}")
    device = input_ids.device
    labels, masked_ids = input_ids.clone(), input_ids.clone()
    is_position = _is_position(input_ids, positions)
    text = torch.bernoulli(torch.full(input_ids.shape, probability, device=device), generator=generator).bool()
    text &= ~(torch.isin(input_ids, torch.tensor([pad_token_id, cls_token_id], device=device)) | is_position)
    if masking == "grouped":
        position = choose_position_groups(input_ids, box_open_id, positions, generator)
    else:
        position = is_position
    chosen = text | position
    labels[~chosen] = IGNORE_INDEX

    to_mask = torch.bernoulli(torch.full(input_ids.shape, 0.8, device=device), generator=generator).bool() & chosen
    if masking == "all":
        to_mask |= position
    masked_ids[to_mask] = mask_token_id
    to_random = (torch.bernoulli(torch.full(input_ids.shape, 0.5, device=device), generator=generator).bool()
                 & chosen & ~to_mask)
    random_ids = torch.randint(vocab_size, input_ids.shape, device=device, dtype=input_ids.dtype, generator=generator)
    masked_ids[to_random] = random_ids[to_random]
    return masked_ids, labels


def soft_position_loss(logits: torch.Tensor, labels: torch.Tensor, positions: range, targets: torch.Tensor,
                       normalisation: str = "vocabulary") -> torch.Tensor:
    """The order-aware soft loss (module docstring), averaged over the tokens whose label is a position token.

    logits: [B, T, V]; labels: [B, T] (-100 where not scored); targets: [bins, bins] (``soft_position_targets``).
    No position token scored gives a zero that stays in the graph.
    """
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"soft loss normalisation {normalisation!r}: use one of {', '.join(NORMALISATIONS)}")
    if len(positions) != targets.shape[0]:
        raise ValueError(f"{len(positions)} position ids but soft targets for {targets.shape[0]} bins")
    scored = _is_position(labels, positions)
    if not bool(scored.any()):
        return logits.sum() * 0.0
    chosen = logits[scored].float()
    if normalisation == "vocabulary":
        log_probabilities = F.log_softmax(chosen, dim=-1)[:, positions.start:positions.stop]
    else:
        log_probabilities = F.log_softmax(chosen[:, positions.start:positions.stop], dim=-1)
    soft = targets.to(chosen.device)[labels[scored] - positions.start]
    return -(soft * log_probabilities).sum(dim=-1).mean()


@dataclass(frozen=True)
class PositionMLMConfig:
    """``objectives.position_mlm`` options; the defaults are PEVL's grounding values."""

    probability: float = 0.15          # text tokens chosen for prediction (PEVL mlm_probability)
    masking: str = "grouped"           # grouped: k of each box's 4 tokens; all: every position token
    mlm: bool = True                   # the "mlm" term (CE + distillation); false: only "soft" (second stage)
    decay: float = 0.15                # exp_decay_ratio: 0.15 grounding, 0.25 VRD/VCR/GQA
    soft_weight: float = 2.0           # postoken_temp
    normalisation: str = "vocabulary"  # softmax over the vocabulary (PEVL's code) or over the position slice
    num_bins: int = NUM_BINS
    first_unused: int = FIRST_UNUSED   # @@ on [unused200]; released PEVL checkpoints need 200
    # The bins' word embeddings (tied to the MLM decoder) when the run starts: "keep" what the backbone was built
    # with (PEVL: BERT's [unused] rows, or model.init_checkpoint's), or "sinusoidal", not PEVL's: a table of
    # sines over the bins in place of BERT's untrained [unused] rows, which are nearly one vector, so that a small
    # model trained from scratch (the demo) tells the bins apart from its first step. Refused with
    # model.init_checkpoint, whose bins it would overwrite; a resumed run loads its own weights after it.
    init_embeddings: str = "keep"

    def __post_init__(self):
        require(0.0 <= self.probability <= 1.0, "probability", f"must lie in [0, 1], got {self.probability}")
        require_choice(self.masking, "masking", MASKINGS)
        require_choice(self.normalisation, "normalisation", NORMALISATIONS)
        require_choice(self.init_embeddings, "init_embeddings", EMBEDDING_INITS)
        require(self.decay > 0, "decay", f"must be positive, got {self.decay}")
        require(self.soft_weight >= 0, "soft_weight", f"must be >= 0, got {self.soft_weight}")
        require(self.num_bins >= 2, "num_bins", f"must be at least 2, got {self.num_bins}")


class PositionMLM(Objective):
    """PEVL's generalised MLM through every text layer, the fusion layers reading the image; terms ``mlm``
    (unless ``mlm: false``) and ``soft``. Momentum distillation of ``mlm`` as ALBEF's MLM."""

    Config = PositionMLMConfig
    terms = ("mlm", "soft")

    def __init__(self, config: PositionMLMConfig, build: BuildContext):
        super().__init__(config, build)
        tokenizer = with_position_tokens(build.tokenizer, num_bins=config.num_bins, first_unused=config.first_unused)
        self.positions = tokenizer.group_ids("position")
        self.special = {"vocab_size": tokenizer.vocab_size, "mask_token_id": tokenizer.mask_token_id,
                        "pad_token_id": tokenizer.pad_token_id, "cls_token_id": tokenizer.cls_token_id,
                        "box_open_id": tokenizer.token_id(BOX_OPEN)}
        # A plain tensor, not a buffer: a bf16/fp16 engine would cast a buffer and round the targets.
        self.soft_targets = soft_position_targets(config.num_bins, config.decay)
        if config.init_embeddings == "sinusoidal":
            require(not build.from_checkpoint, "objectives.position_mlm.init_embeddings",
                    "sinusoidal would overwrite the bins' embeddings loaded from model.init_checkpoint; use keep")
            embeddings = build.model.text_encoder.bert.embeddings.word_embeddings.weight
            with torch.no_grad():  # at the mean norm of the vocabulary's rows
                norm = embeddings.norm(dim=1).mean().item()
                rows = slice(self.positions.start, self.positions.stop)
                embeddings[rows] = sinusoidal_position_embeddings(config.num_bins, embeddings.shape[1], norm)
        self.distill = config.mlm and build.distillation_alpha > 0

    def needs(self) -> Needs:
        return Needs(momentum=("visual_encoder", "text_encoder")) if self.distill else Needs()

    def forward(self, encoded: Encoded, encoded_m: Encoded | None, batch: dict,
                step: StepContext) -> dict[str, torch.Tensor]:
        masked_ids, labels = mask_with_positions(batch["input_ids"], positions=self.positions,
                                                 probability=self.config.probability, masking=self.config.masking,
                                                 **self.special)
        # The MLM head (a vocabulary-wide projection, most of the step's cost with short hidden sizes) runs on
        # the chosen positions only: both terms read nothing else, so the losses are the same.
        chosen = labels != IGNORE_INDEX
        labels = labels[chosen][None]
        text_encoder = step.model.text_encoder
        hidden = text_encoder(masked_ids, encoded.attention_mask, encoded.image_tokens)
        logits = text_encoder.mlm_logits(hidden[chosen][None])
        terms = {}
        if self.config.mlm:
            logits_m = None
            if step.alpha > 0 and self.distill:
                with torch.no_grad(), step.autocast(encoded_m.image_tokens):
                    text_encoder_m = step.momentum.text_encoder
                    hidden_m = text_encoder_m(masked_ids, encoded.attention_mask, encoded_m.image_tokens)
                    logits_m = text_encoder_m.mlm_logits(hidden_m[chosen][None]).float()
            terms["mlm"] = mlm_loss(logits.float(), labels, logits_m, step.alpha)
        terms["soft"] = self.config.soft_weight * soft_position_loss(
            logits, labels, self.positions, self.soft_targets, self.config.normalisation)
        return terms
