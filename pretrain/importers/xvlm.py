"""Released X-VLM checkpoints in and out: the key map between X-VLM's state dicts and this project's layout.

X-VLM saves ``{"model": state_dict, "config": ...}`` (``.th``/``.pth``). Its image tower is a Swin (Microsoft's
names), a CLIP ViT (Hugging Face-style names) or a DeiT ViT (timm's names) under ``vision_encoder.``; its text tower
is BERT under ``text_encoder.`` (``text_encoder.bert.*`` + ``text_encoder.cls.*`` in pretraining files, a bare
``BertModel`` in fine-tuned ones); its heads are ``vision_proj``, ``text_proj``, ``temp``, ``itm_head.{0,1,3}`` and
``bbox_head.{0,1,3}``; fine-tuned files add ``text_decoder.*`` (VQA's answer decoder; captioning's whole decoder,
which replaces the text encoder), ``cls_head.*`` and ``ta_head.*`` (NLVR2), a doubled fusion encoder (NLVR2).

``import_xvlm`` maps such a state to the layout ``python -m pretrain.export`` writes and every reader here takes
(``finetune.<task> --checkpoint FILE``): the backbone in ALBEF's names (``visual_encoder.*`` as timm names it,
``text_encoder.bert.*``, ``text_encoder.cls.*``, projections, ``itm_head.*``, ``temp``), the box head as the ``box``
objective's (``objectives.box.head.layers.*``), task heads and decoders as the fine-tuning tasks read them. Every key
is accounted for: mapped, dropped by rule (buffers recomputed from the shapes: ``position_ids``,
``relative_position_index``, ``attn_mask``), or listed as unplaced (an error unless allowed). Image-size changes are
resized where a checkpoint is loaded: ViT position embeddings interpolated, Swin relative-position tables resized to
the model's windows (``pretrain.models.swin.fit_vision_state``; X-VLM issue #35 is this failure).

``export_xvlm`` goes back: a state in this project's layout -> X-VLM's pretraining layout for an image tower of
``kind`` ``swin`` / ``clip`` / ``deit``, its recomputed buffers written as X-VLM's code computes them.

    python -m pretrain.importers.xvlm import xvlm_4m.th xvlm_4m.safetensors [--allow-unplaced]
    python -m pretrain.importers.xvlm export runs/xvlm/checkpoints xvlm_ours.th

Tests: ``.venv/bin/python -m pytest -q tests/pretrain/importers/test_xvlm.py``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

VISION_KINDS = ("swin", "clip", "deit")
BOX_HEAD = "objectives.box.head.layers."          # the box objective's head (pretrain/objectives/region_box.py)
RECOMPUTED = ("position_ids", "relative_position_index", "attn_mask")
HEADS = ("vision_proj.", "text_proj.", "itm_head.", "ta_head.", "cls_head.")


class XVLMImportError(ValueError):
    """A released file that does not map; the message lists the keys."""


@dataclass
class ImportReport:
    """What ``import_xvlm`` did with every released key."""

    vision: str                                                  # swin | clip | deit
    mapped: dict[str, str] = field(default_factory=dict)         # released key -> our key
    dropped: dict[str, str] = field(default_factory=dict)        # released key -> why (recomputed, shared copy)
    unplaced: list[str] = field(default_factory=list)            # released keys with no place here

    def summary(self) -> str:
        lines = [f"image tower: {self.vision}; {len(self.mapped)} keys mapped, {len(self.dropped)} dropped by rule"]
        reasons = sorted(set(self.dropped.values()))
        lines += [f"  dropped ({reason}): {sum(1 for r in self.dropped.values() if r == reason)}" for reason in reasons]
        if self.unplaced:
            lines.append(f"  UNPLACED ({len(self.unplaced)}): " + ", ".join(self.unplaced[:20])
                         + (" ..." if len(self.unplaced) > 20 else ""))
        return "\n".join(lines)


def detect_vision(state: dict) -> str:
    """``swin``, ``clip`` or ``deit``, from the keys of a released state's image tower."""
    if any(key.startswith("vision_encoder.layers.") for key in state):
        return "swin"
    if "vision_encoder.class_embedding" in state or any(key.startswith("vision_encoder.encoder.layers.")
                                                         for key in state):
        return "clip"
    if "vision_encoder.cls_token" in state:
        return "deit"
    raise XVLMImportError("no X-VLM image tower in this state: expected vision_encoder.layers.* (Swin), "
                       "vision_encoder.class_embedding (CLIP ViT) or vision_encoder.cls_token (DeiT)")


# --- image tower -----------------------------------------------------------------------------------------------
def _microsoft_layer(name: str, offset: int) -> str:
    """Swin patch merging: Microsoft's at the end of stage i is timm's at the start of stage i + 1 (offset +1)."""
    return re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) + offset}.downsample", name)


CLIP_RENAMES = (("pre_layrnorm.", "norm_pre."), ("post_layernorm.", "norm."), ("encoder.layers.", "blocks."),
                (".self_attn.out_proj.", ".attn.proj."), (".layer_norm1.", ".norm1."), (".layer_norm2.", ".norm2."),
                ("patch_embed.weight", "patch_embed.proj.weight"))


def _import_vision(state: dict, kind: str, report: ImportReport) -> dict:
    tower = {key[len("vision_encoder."):]: value for key, value in state.items() if key.startswith("vision_encoder.")}
    ours = {}
    if kind == "clip":
        fused: dict[str, dict[str, torch.Tensor]] = {}
        for name, value in tower.items():
            match = re.match(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$", name)
            if match:  # timm fuses q, k, v into one Linear
                layer, part, kind_ = match.groups()
                fused.setdefault(f"blocks.{layer}.attn.qkv.{kind_}", {})[part] = value
                report.mapped[f"vision_encoder.{name}"] = f"visual_encoder.blocks.{layer}.attn.qkv.{kind_}"
                continue
            if name == "position_ids":
                report.dropped[f"vision_encoder.{name}"] = "recomputed buffer"
                continue
            if name == "class_embedding":
                target, value = "cls_token", value.reshape(1, 1, -1)
            elif name == "pos_embed.weight":
                target, value = "pos_embed", value.unsqueeze(0)
            else:
                target = name
                for old, new in CLIP_RENAMES:
                    target = target.replace(old, new)
            ours[target] = value
            report.mapped[f"vision_encoder.{name}"] = f"visual_encoder.{target}"
        for target, parts in fused.items():
            if set(parts) != {"q", "k", "v"}:
                raise XVLMImportError(f"{target}: the file lacks part of q/k/v ({sorted(parts)})")
            ours[target] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    else:
        for name, value in tower.items():
            if name.split(".")[-1] in RECOMPUTED:
                report.dropped[f"vision_encoder.{name}"] = "recomputed buffer"
                continue
            target = _microsoft_layer(name, +1) if kind == "swin" else name
            ours[target] = value
            report.mapped[f"vision_encoder.{name}"] = f"visual_encoder.{target}"
    return {f"visual_encoder.{name}": value for name, value in ours.items()}


# --- the whole state -------------------------------------------------------------------------------------------
def _text_key(key: str, tower: str, target_tower: str) -> str:
    """``tower.X`` as ``target_tower.bert.X`` / ``target_tower.cls.X``, whether or not X-VLM wrote ``bert.``."""
    rest = key[len(tower) + 1:]
    if not rest.startswith(("bert.", "cls.")):
        rest = "bert." + rest
    return f"{target_tower}.{rest}"


def import_xvlm(state: dict, allow_unplaced: bool = False) -> tuple[dict, ImportReport]:
    """A released X-VLM state (or ``{"model": state}``) in this project's layout, with the report of every key."""
    if isinstance(state.get("model"), dict):
        state = state["model"]
    state = {key.removeprefix("module."): value for key, value in state.items()}
    report = ImportReport(vision=detect_vision(state))
    ours = _import_vision(state, report.vision, report)
    has_encoder = any(key.startswith("text_encoder.") for key in state)
    for key, value in state.items():
        if key.startswith("vision_encoder."):
            continue
        if key.endswith(".position_ids"):
            report.dropped[key] = "recomputed buffer"
            continue
        if key.startswith("text_encoder."):
            target = _text_key(key, "text_encoder", "text_encoder")
        elif key.startswith("text_decoder."):
            # Captioning's decoder IS the whole text tower (its encoder is None); VQA's decoder sits beside it.
            target = _text_key(key, "text_decoder", "text_decoder" if has_encoder else "text_encoder")
        elif key.startswith("bbox_head."):
            target = BOX_HEAD + key[len("bbox_head."):]
        elif key == "temp" or key.startswith(HEADS):
            target = key
        else:
            report.unplaced.append(key)
            continue
        ours[target] = value
        report.mapped[key] = target
    if report.unplaced and not allow_unplaced:
        raise XVLMImportError("these keys of the X-VLM file have no place in this project's model:\n  "
                           + "\n  ".join(report.unplaced) + "\n(pass --allow-unplaced to import the rest)")
    return ours, report


# --- export ----------------------------------------------------------------------------------------------------
def swin_relative_position_index(window: int) -> torch.Tensor:
    """X-VLM's (Microsoft's) relative position index of a window: [w*w, w*w] long."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
    relative[:, :, 0] += window - 1
    relative[:, :, 1] += window - 1
    relative[:, :, 0] *= 2 * window - 1
    return relative.sum(-1)


def swin_shift_mask(resolution: int, window: int, shift: int) -> torch.Tensor:
    """X-VLM's (Microsoft's) shifted-window attention mask [windows, w*w, w*w]: 0 within a region, -100 across."""
    image = torch.zeros(1, resolution, resolution, 1)
    count = 0
    for rows in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for columns in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            image[:, rows, columns, :] = count
            count += 1
    windows = image.view(1, resolution // window, window, resolution // window, window, 1)
    windows = windows.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window)
    mask = windows.unsqueeze(1) - windows.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


def _export_vision(state: dict, kind: str, visual_encoder) -> dict:
    tower = {key[len("visual_encoder."):]: value for key, value in state.items() if key.startswith("visual_encoder.")}
    out = {}
    if kind == "swin":
        for name, value in tower.items():
            out[_microsoft_layer(name, -1)] = value
        for stage_index, stage in enumerate(visual_encoder.layers):
            for block_index, block in enumerate(stage.blocks):
                prefix = f"layers.{stage_index}.blocks.{block_index}.attn."
                window, shift = block.window_size[0], block.shift_size[0]
                out[prefix + "relative_position_index"] = swin_relative_position_index(window)
                if shift > 0:
                    resolution = block.input_resolution[0]
                    out[f"layers.{stage_index}.blocks.{block_index}.attn_mask"] = swin_shift_mask(resolution, window,
                                                                                                  shift)
    elif kind == "clip":
        for name, value in tower.items():
            match = re.match(r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", name)
            if match:
                layer, kind_ = match.groups()
                for part, chunk in zip("qkv", value.chunk(3, dim=0), strict=True):
                    out[f"encoder.layers.{layer}.self_attn.{part}_proj.{kind_}"] = chunk.clone()
                continue
            if name == "cls_token":
                out["class_embedding"] = value.reshape(-1)
                continue
            if name == "pos_embed":
                out["pos_embed.weight"] = value.reshape(value.shape[-2], value.shape[-1])
                out["position_ids"] = torch.arange(value.shape[-2]).unsqueeze(0)
                continue
            target = name
            for old, new in reversed(CLIP_RENAMES):
                target = target.replace(new, old)
            out[target] = value
    else:
        out = dict(tower)
    return {f"vision_encoder.{name}": value for name, value in out.items()}


def export_xvlm(state: dict, kind: str, visual_encoder=None) -> dict:
    """This project's layout (a ``pretrain.export`` file's tensors) -> X-VLM's pretraining ``model`` state.

    ``visual_encoder`` (the built image tower) gives a Swin's windows and shifts for its recomputed buffers.
    Momentum copies, queues and other objectives' heads have no place in X-VLM's file and are left out.
    """
    if kind not in VISION_KINDS:
        raise ValueError(f"kind must be one of {', '.join(VISION_KINDS)}, got {kind!r}")
    if kind == "swin" and visual_encoder is None:
        raise ValueError("exporting a Swin needs its built image tower (its windows make the attention buffers)")
    out = _export_vision(state, kind, visual_encoder)
    for key, value in state.items():
        if key.startswith("text_encoder."):
            out[key] = value
        elif key.startswith(BOX_HEAD):
            out["bbox_head." + key[len(BOX_HEAD):]] = value
        elif key == "temp":
            out["temp"] = value.reshape(())
        elif key.startswith(("vision_proj.", "text_proj.", "itm_head.")):
            out[key] = value
    positions = out.get("text_encoder.bert.embeddings.position_embeddings.weight")
    if positions is not None:
        out["text_encoder.bert.embeddings.position_ids"] = torch.arange(positions.shape[0]).unsqueeze(0)
    return out


def vision_kind(vision_name: str) -> str:
    """The X-VLM image tower a timm model name stands for."""
    if vision_name.startswith("swin"):
        return "swin"
    return "clip" if "clip" in vision_name else "deit"


# --- command line ----------------------------------------------------------------------------------------------
def _import_command(args) -> int:
    from safetensors.torch import save_file

    from pretrain.models import read_state_dict

    state = read_state_dict(args.input, trusted=args.trust_checkpoint)
    ours, report = import_xvlm(state, allow_unplaced=args.allow_unplaced)
    ours = {name: value.detach().clone().contiguous() for name, value in ours.items()}
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    save_file(ours, args.output, metadata={"format": "pt", "source": args.input, "method": "xvlm", "config": ""})
    print(report.summary())
    print(f"wrote {args.output}")
    return 0


def _export_command(args) -> int:
    import yaml
    from safetensors.torch import load_file

    from pretrain.build import build_backbone
    from pretrain.checkpoint import read_latest
    from pretrain.config import from_mapping
    from pretrain.export import albef_state_dict
    from pretrain.schema import PretrainConfig

    if os.path.isfile(args.checkpoint):
        from safetensors import safe_open

        state = load_file(args.checkpoint)
        with safe_open(args.checkpoint, "pt") as handle:
            config_text = (handle.metadata() or {}).get("config", "")
    else:
        directory = os.path.normpath(args.checkpoint)
        tag = read_latest(directory) if not os.path.basename(directory).startswith("global_step") else None
        if tag is None:
            directory, tag = os.path.dirname(directory), os.path.basename(directory)
        state = albef_state_dict(directory, tag, args.trust_checkpoint)
        config_path = os.path.join(directory, tag, "config.yaml")
        config_text = Path(config_path).read_text() if os.path.exists(config_path) else ""
    if not config_text:
        raise ValueError(f"{args.checkpoint}: no experiment config beside it (config.yaml) to tell its image tower")
    config = from_mapping(PretrainConfig, yaml.safe_load(config_text))
    model, _ = build_backbone(config.model)
    kind = vision_kind(config.model.vision)
    released = export_xvlm(state, kind, model.visual_encoder)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    torch.save({"model": released}, args.output)
    print(f"wrote {args.output}: {len(released)} keys in X-VLM's pretraining layout ({kind} image tower)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.importers.xvlm", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    imported = commands.add_parser("import", help="released X-VLM .th/.pth -> .safetensors in this project's layout")
    imported.add_argument("input")
    imported.add_argument("output")
    imported.add_argument("--allow-unplaced", action="store_true", help="import what maps; list the rest")
    imported.add_argument("--trust-checkpoint", action="store_true", help="open the pickle with the full unpickler")
    exported = commands.add_parser("export", help="a pretraining checkpoint or .safetensors -> X-VLM's layout")
    exported.add_argument("checkpoint")
    exported.add_argument("output")
    exported.add_argument("--trust-checkpoint", action="store_true", help="open the pickles with the full unpickler")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return _import_command(args) if args.command == "import" else _export_command(args)
    except (XVLMImportError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
