"""ViCHA's released checkpoints, both ways: their key layout <-> this project's exported layout.

ViCHA saves ``{"model": state_dict, ...}`` of its ``kw_img_ViCHA`` (pretraining) and of its fine-tuning models.
Its keys are ALBEF's (``visual_encoder.*``, ``text_encoder.bert.*``/``text_encoder.*``, projections, ``itm_head``,
``temp``, ``*_m.*``, queues) plus:

=====================================================  ===============================================================
ViCHA                                                  here (``pretrain.export``'s layout)
=====================================================  ===============================================================
``kw_encoder.{embeddings,encoder}.*`` (2-layer BERT)   ``concept_encoder.text.bert.{embeddings,encoder}.*``
``kw_proj.*``                                          ``concept_encoder.proj.*``
``kw_encoder_m.*``, ``kw_proj_m.*``                    ``concept_encoder_m.text.bert.*``, ``concept_encoder_m.proj.*``
``vision_proj_hidden.i.*``, ``text_proj_hidden.i.*``   ``objectives.hitc.vision_proj_hidden.i.*`` (and text)
``decoder_embed.*``, ``decoder_blocks.*``,             ``objectives.mim.<same name>``
``decoder_norm.*``, ``mask_token``, ``mae_proj.*``
``decoder_pos_embed`` (fixed sin-cos)                  not stored: checked against the fixed table, re-created on export
``*.embeddings.position_ids`` (buffers)                not stored: checked to be 0..n-1, re-created on export
=====================================================  ===============================================================

Every other key passes through under its own name: ALBEF's backbone, momentum copies and queues (read by
``pretrain.models.albef.from_albef_state_dict``), and fine-tuned task heads (``text_decoder*`` of VQA,
``cls_head*`` of NLVR2 and SNLI-VE, ``idx_queue`` of retrieval). A key this map does not know (e.g. the
cross-modal MAE's ``mae_proj_uni``, which ViCHA's released recipe does not use) is an error naming it, so every
key of a file is accounted for::

    ours, report = from_vicha_state_dict(torch.load("vicha_pretrain.pth")["model"])  # -> pretrain.export layout
    released = to_vicha_state_dict(ours)                                              # -> ViCHA's layout

Command line (a released file -> a ``.safetensors`` that fine-tuning, the scorer and export read, and back)::

    python -m pretrain.importers.vicha import vicha.pth vicha.safetensors --config pretrain/configs/vicha.yaml
    python -m pretrain.importers.vicha export runs/vicha/checkpoints vicha_released_layout.pth

``pretrain.models.albef.from_albef_state_dict`` applies the import itself to a state in ViCHA's layout, so
``--checkpoint vicha.pth`` works wherever an ALBEF file does.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass, field

import torch

# ViCHA's module prefix -> ours. Momentum copies keep the "_m" after the tower, as ALBEF's.
PREFIXES = (("kw_encoder_m.", "concept_encoder_m.text.bert."), ("kw_proj_m.", "concept_encoder_m.proj."),
            ("kw_encoder.", "concept_encoder.text.bert."), ("kw_proj.", "concept_encoder.proj."),
            ("vision_proj_hidden.", "objectives.hitc.vision_proj_hidden."),
            ("text_proj_hidden.", "objectives.hitc.text_proj_hidden."),
            ("decoder_embed.", "objectives.mim.decoder_embed."), ("decoder_blocks.", "objectives.mim.decoder_blocks."),
            ("decoder_norm.", "objectives.mim.decoder_norm."), ("mae_proj.", "objectives.mim.mae_proj."))
RENAMED = {"mask_token": "objectives.mim.mask_token"}
FIXED = ("decoder_pos_embed",)
# ALBEF's own keys, and the fine-tuned tasks' heads, pass through.
PASS_THROUGH = ("visual_encoder.", "visual_encoder_m.", "text_encoder.", "text_encoder_m.", "vision_proj.",
                "vision_proj_m.", "text_proj.", "text_proj_m.", "itm_head.", "text_decoder.", "text_decoder_m.",
                "cls_head.", "cls_head_m.", "ta_head.")
PASS_THROUGH_KEYS = ("temp", "image_queue", "text_queue", "queue_ptr", "idx_queue")
POSITION_IDS = ".embeddings.position_ids"


class VichaLayoutError(ValueError):
    """A state that is not in ViCHA's layout as this map knows it; the message names the keys."""


@dataclass
class ImportReport:
    mapped: list[str] = field(default_factory=list)     # ViCHA keys renamed
    kept: list[str] = field(default_factory=list)       # ViCHA keys whose name is ours too
    dropped: list[str] = field(default_factory=list)    # fixed buffers, checked and not stored

    def summary(self) -> str:
        return f"{len(self.mapped)} keys renamed, {len(self.kept)} kept, {len(self.dropped)} fixed buffers checked"


def is_vicha_layout(state: dict) -> bool:
    """Whether a state holds ViCHA's own keys (its concept encoder, H-ITC or MAE heads)."""
    return any(key.startswith(tuple(prefix for prefix, _ in PREFIXES)) or key in RENAMED or key in FIXED
               for key in state)


def sincos_table(width: int, grid: int) -> torch.Tensor:
    """ViCHA's fixed decoder positions, ``[1, 1 + grid * grid, width]`` (as the MAE objective builds them)."""
    from pretrain.objectives.mim import sincos_positions

    return sincos_positions(width, grid).unsqueeze(0)


def _check_fixed(key: str, value: torch.Tensor) -> None:
    if key == "decoder_pos_embed":
        grid = math.isqrt(value.shape[1] - 1)
        if grid * grid != value.shape[1] - 1 or not torch.allclose(value.float(), sincos_table(value.shape[2], grid),
                                                                    atol=1e-5):
            raise VichaLayoutError("decoder_pos_embed is not the fixed 2-D sin-cos table the MAE decoder uses; "
                                   "this checkpoint's decoder differs from ViCHA's")
    elif key.endswith(POSITION_IDS) and not torch.equal(value.reshape(-1).long(), torch.arange(value.numel())):
        raise VichaLayoutError(f"{key} is not 0..{value.numel() - 1}; position ids other than BERT's are not supported")


def from_vicha_state_dict(state: dict) -> tuple[dict, ImportReport]:
    """ViCHA's ``model`` dict (a ``{"model": ...}`` wrapper is unwrapped) -> this project's exported layout."""
    if isinstance(state.get("model"), dict):
        state = state["model"]
    ours, report, unknown = {}, ImportReport(), []
    for key, value in state.items():
        if key in FIXED or (key.startswith(("kw_encoder.", "kw_encoder_m.")) and key.endswith(POSITION_IDS)):
            _check_fixed(key, value)
            report.dropped.append(key)
            continue
        renamed = RENAMED.get(key)
        for prefix, target in PREFIXES:
            if renamed is None and key.startswith(prefix):
                renamed = target + key[len(prefix):]
        if renamed is not None:
            ours[renamed] = value
            report.mapped.append(key)
        elif key.startswith(PASS_THROUGH) or key in PASS_THROUGH_KEYS:
            ours[key] = value
            report.kept.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise VichaLayoutError(f"keys outside ViCHA's released layout (this map knows the pretraining and fine-tuning "
                               f"models of its kw_img recipe): {sorted(unknown)[:12]}")
    return ours, report


def to_vicha_state_dict(state: dict) -> dict:
    """This project's exported layout -> ViCHA's: the inverse renames, ``decoder_pos_embed`` and the concept
    encoders' ``position_ids`` re-created (ViCHA's code loads strictly and expects them)."""
    inverse_prefixes = sorted(((target, prefix) for prefix, target in PREFIXES), key=lambda pair: -len(pair[0]))
    inverse_renamed = {target: key for key, target in RENAMED.items()}
    released, unknown = {}, []
    for key, value in state.items():
        renamed = inverse_renamed.get(key)
        for target, prefix in inverse_prefixes:
            if renamed is None and key.startswith(target):
                renamed = prefix + key[len(target):]
        if renamed is None and key.startswith("objectives."):
            unknown.append(key)
            continue
        released[renamed or key] = value
    if unknown:
        raise VichaLayoutError(f"heads of objectives ViCHA does not have: {sorted(unknown)[:12]}; export them with "
                               "pretrain.export instead")
    if "mask_token" in released and "objectives.mim.decoder_embed.weight" in state:
        width = released["mask_token"].shape[-1]
        patches = state["visual_encoder.pos_embed"].shape[1] - 1
        released["decoder_pos_embed"] = sincos_table(width, math.isqrt(patches))
    for prefix in ("kw_encoder", "kw_encoder_m"):
        positions = released.get(f"{prefix}.embeddings.position_embeddings.weight")
        if positions is not None:
            released[f"{prefix}{POSITION_IDS}"] = torch.arange(positions.shape[0]).unsqueeze(0)
    for prefix in ("text_encoder", "text_encoder_m"):  # ALBEF's text encoders, as pretrain.models.albef does
        positions = released.get(f"{prefix}.bert.embeddings.position_embeddings.weight")
        if positions is not None and f"{prefix}.bert{POSITION_IDS}" not in released:
            released[f"{prefix}.bert{POSITION_IDS}"] = torch.arange(positions.shape[0]).unsqueeze(0)
    if "temp" in released:
        released["temp"] = released["temp"].reshape(())
    return released


def import_file(source: str, output: str, config: str | None, trusted: bool = False) -> ImportReport:
    """A released ViCHA ``.pth`` -> a ``.safetensors`` in ``pretrain.export``'s layout (with its ``.yaml``)."""
    from safetensors.torch import save_file

    from pretrain.models import read_state_dict

    ours, report = from_vicha_state_dict(read_state_dict(source, trusted))
    config_text = ""
    if config:
        with open(config) as handle:
            config_text = handle.read()
    save_file({key: value.detach().clone().contiguous() for key, value in ours.items()}, output,
              metadata={"format": "pt", "source": source, "method": "vicha", "config": config_text})
    with open(os.path.splitext(output)[0] + ".yaml", "w") as handle:
        handle.write(config_text)
    return report


def export_file(checkpoint: str, output: str, trusted: bool = False) -> int:
    """A pretraining run's checkpoint (or an exported ``.safetensors``) -> ViCHA's ``{"model": ...}`` ``.pth``."""
    from pretrain.checkpoint import read_latest
    from pretrain.export import albef_state_dict
    from pretrain.models import read_state_dict

    if os.path.isdir(checkpoint):
        directory, tag = os.path.normpath(checkpoint), None
        if os.path.basename(directory).startswith("global_step"):
            directory, tag = os.path.dirname(directory), os.path.basename(directory)
        tag = tag or read_latest(directory)
        if tag is None:
            raise FileNotFoundError(f"{checkpoint}: no 'latest' file; give a checkpoints directory or global_stepN")
        state = albef_state_dict(directory, tag, trusted)
    else:
        state = read_state_dict(checkpoint, trusted)
    released = to_vicha_state_dict(state)
    torch.save({"model": released}, output)
    return len(released)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.importers.vicha", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    to_ours = commands.add_parser("import", help="a released ViCHA .pth -> this project's .safetensors")
    to_ours.add_argument("source")
    to_ours.add_argument("output")
    to_ours.add_argument("--config", help="experiment YAML describing the model (saved beside the output)")
    to_released = commands.add_parser("export", help="a checkpoint of this project -> ViCHA's .pth layout")
    to_released.add_argument("checkpoint")
    to_released.add_argument("output")
    for command in (to_ours, to_released):
        command.add_argument("--trust-checkpoint", action="store_true", help="open pickles with the full unpickler")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.command == "import":
            report = import_file(args.source, args.output, args.config, args.trust_checkpoint)
            print(f"wrote {args.output}: {report.summary()}")
        else:
            count = export_file(args.checkpoint, args.output, args.trust_checkpoint)
            print(f"wrote {args.output}: {count} keys in ViCHA's layout")
    except (VichaLayoutError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
