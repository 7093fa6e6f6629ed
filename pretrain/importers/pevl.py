"""PEVL's released checkpoints: their key map, both directions, and the check of their position-token ids.

PEVL's models (``models/model_pretrain.py``, ``model_grounding.py``, ``model_vrd.py``, ``model_vcr.py``,
``model_vqa.py`` of thunlp/PEVL) all hold ALBEF's modules under ALBEF's names, so a released file
(``{"model": state, ...}``: ``pevl_pretrain.pth``, ``grounding.pth``, ``vrd.pth``, ``pevl_vcr_ssp.pth``,
``pevl_vcr_finetune.pth``) has, key by key:

- ``visual_encoder.*``, ``text_encoder.bert.*`` (``embeddings.position_ids`` included: transformers 4.8 saved
  it), ``text_encoder.cls.predictions.*``, ``vision_proj.*``, ``text_proj.*``, ``itm_head.*``, ``temp`` (0-d):
  the backbone, under our names;
- ``visual_encoder_m.*``, ``vision_proj_m.*``, ``text_encoder_m.*``, ``text_proj_m.*``: the momentum copies;
- ``image_queue``, ``text_queue`` [embed_dim, 65536], ``queue_ptr`` [1]: ITC's queues;
- the first-stage model only: ``idx_queue`` and ``image_idx_queue`` [1, 65536], filled with -100 and never
  written by PEVL's code: ignored on the way in, written back as -100 on the way out.

``import_pevl_state`` sorts every key of a file into one of these parts and lists the ignored ones with their
reason, so a caller can show that every key was accounted for; ``pevl_state`` is the inverse. The vocabulary
is BERT's (30522 rows): PEVL's ``@@``, ``[pos_0]``..``[pos_511]``, ``##`` (and VRD's ``[unrel]``) sit on
``[unused200]``..``[unused714]``, ids 205..719 in bert-base-uncased's ``vocab.txt``, which is PEVL's
``configs/vocab.txt``. ``check_position_token_ids`` refuses a tokenizer whose ids differ (another vocabulary)
and a checkpoint whose embedding table does not reach them::

    imported = import_pevl_state(read_state_dict("grounding.pth"), num_patches=model.visual_encoder.num_patches)
    check_position_token_ids(tokenizer, imported.model["text_encoder.bert.embeddings.word_embeddings.weight"])
    model.load_state_dict(imported.model)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pretrain.models.albef import POSITION_IDS_SUFFIX, from_albef_state_dict, to_albef_state_dict
from pretrain.text.positions import (
    BOX_CLOSE,
    BOX_OPEN,
    FIRST_UNUSED,
    NUM_BINS,
    UNRELATED,
    position_token,
)

# Buffers of PEVL's first-stage model that its code never writes (retrieval-style id queues).
UNUSED_QUEUES = ("idx_queue", "image_idx_queue")
# The ids PEVL's tokenizer gives its tokens: [unused200] is id 205 in its configs/vocab.txt (bert-base-uncased).
RELEASED_BOX_OPEN_ID = 205


class PevlCheckpointError(ValueError):
    """A file that does not fit PEVL's layout, or a tokenizer whose position ids differ from PEVL's."""


@dataclass
class ImportedCheckpoint:
    """A PEVL file sorted into our parts; ``ignored`` maps each key left out to the reason."""

    model: dict[str, torch.Tensor]
    momentum: dict[str, torch.Tensor]
    queues: dict[str, torch.Tensor]
    ignored: dict[str, str] = field(default_factory=dict)


def import_pevl_state(state: dict, num_patches: int | None = None) -> ImportedCheckpoint:
    """Every key of a PEVL file (or its ``model`` dict) in our names; see the module docstring."""
    if isinstance(state.get("model"), dict):
        state = state["model"]
    ignored = {key: "PEVL's unused id queue (never written by its code)" for key in UNUSED_QUEUES if key in state}
    ignored.update({key: "position ids buffer (recomputed by the text encoder)" for key in state
                    if key.endswith(POSITION_IDS_SUFFIX)})
    kept = {key: value for key, value in state.items() if key not in ignored}
    model, momentum, queues = from_albef_state_dict(kept, num_patches=num_patches)
    unknown = sorted(key for key in model if not key.startswith(("visual_encoder.", "text_encoder.", "vision_proj.",
                                                                 "text_proj.", "itm_head.", "temp")))
    if unknown:
        raise PevlCheckpointError(f"keys outside PEVL's layout: {', '.join(unknown[:8])}"
                                  f"{f' ... ({len(unknown) - 8} more)' if len(unknown) > 8 else ''}")
    return ImportedCheckpoint(model, momentum, queues, ignored)


def accounted_keys(imported: ImportedCheckpoint) -> set[str]:
    """The file's keys, recovered from the imported parts (to show that none was lost)."""
    names = {f"{key.split('.', 1)[0]}_m.{key.split('.', 1)[1]}" for key in imported.momentum}
    return set(imported.model) | names | set(imported.queues) | set(imported.ignored)


def pevl_state(model: dict[str, torch.Tensor], momentum: dict[str, torch.Tensor] | None = None,
               queues: dict[str, torch.Tensor] | None = None, first_stage: bool = False) -> dict[str, torch.Tensor]:
    """The inverse of ``import_pevl_state``: a ``model`` dict PEVL's code loads strictly (``first_stage`` adds
    the two unused id queues of ``PEVL_pretrain``)."""
    state = to_albef_state_dict(model, momentum, queues)
    if first_stage:
        size = state["image_queue"].shape[1] if "image_queue" in state else 65536
        for key in UNUSED_QUEUES:
            state[key] = torch.full((1, size), -100, dtype=torch.long)
    return state


def pevl_token_ids(num_bins: int = NUM_BINS, unrelated: bool = False) -> dict[str, int]:
    """The ids PEVL's own tokenizer gives ``@@``, the bins, ``##`` (and ``[unrel]``)."""
    tokens = [BOX_OPEN, *(position_token(index) for index in range(num_bins)), BOX_CLOSE]
    if unrelated:
        tokens.append(UNRELATED)
    return {token: RELEASED_BOX_OPEN_ID + index for index, token in enumerate(tokens)}


def check_position_token_ids(tokenizer, word_embeddings: torch.Tensor | None = None, *, num_bins: int = NUM_BINS,
                             first_unused: int = FIRST_UNUSED, unrelated: bool = False) -> None:
    """Refuse a tokenizer whose position-token ids differ from those a released PEVL checkpoint was trained with,
    and a checkpoint whose word embeddings (``[vocabulary, hidden]``) do not reach them."""
    expected = pevl_token_ids(num_bins, unrelated)
    if first_unused != FIRST_UNUSED:
        raise PevlCheckpointError(f"position tokens start on [unused{first_unused}], PEVL's on [unused{FIRST_UNUSED}]"
                                  "; a released checkpoint needs first_unused: 200")
    wrong = [(token, tokenizer.token_id(token), pevl_id) for token, pevl_id in expected.items()
             if tokenizer.token_id(token) != pevl_id]
    if wrong:
        token, ours, theirs = wrong[0]
        raise PevlCheckpointError(
            f"the tokenizer gives {token} id {ours}, PEVL's checkpoints were trained with id {theirs} "
            f"({len(wrong)} position tokens differ); use bert-base-uncased's vocab.txt (model.bert_dir)")
    if word_embeddings is not None and word_embeddings.shape[0] <= max(expected.values()):
        raise PevlCheckpointError(f"the checkpoint's word embeddings have {word_embeddings.shape[0]} rows; PEVL's "
                                  f"position tokens need ids up to {max(expected.values())}")
