"""ALBEF backbone model code: ``vision`` (timm ViT), ``text`` (BERT with fusion layers), ``albef`` (both, heads).

This file holds what the explicit weight loaders of both towers share, so that they do not import each
other: ``LoadReport`` (what a loader did, key by key) and ``read_state_dict`` (a local weight file)::

    from pretrain.models.albef import build_albef, load_pretrained_encoders
    reports = load_pretrained_encoders(model, vision_weights="deit_base.pth", bert_dir="bert-base-uncased/")
    print(reports["text"].summary())
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from pretrain.safe_loading import UnsafeCheckpointError, load_file


@dataclass(frozen=True)
class LoadReport:
    """What a weight loader did with a checkpoint, key by key (model names, sorted).

    ``missing`` and ``unexpected`` are the surprises a caller should look at; the other fields record
    what the loader's rules did on purpose.
    """

    missing: tuple[str, ...] = ()  # model keys that the checkpoint should have had; left as initialised
    unexpected: tuple[str, ...] = ()  # checkpoint keys with no place in the model; ignored
    expected_missing: tuple[str, ...] = ()  # new by design (e.g. cross-attention): randomly initialised
    dropped: tuple[str, ...] = ()  # checkpoint keys ignored by rule (classifier head, pooler, position_ids)
    resized: tuple[str, ...] = ()  # keys adapted to the model's shape (pos_embed to a new image size)

    @property
    def clean(self) -> bool:
        """True when nothing was missing or unexpected beyond what the loader's rules expect."""
        return not self.missing and not self.unexpected

    def summary(self) -> str:
        """One line per non-empty field, for the training log."""
        lines = []
        for name in ("missing", "unexpected", "expected_missing", "dropped", "resized"):
            keys = getattr(self, name)
            if keys:
                shown = ", ".join(keys[:8]) + (f", ... ({len(keys) - 8} more)" if len(keys) > 8 else "")
                lines.append(f"{name} ({len(keys)}): {shown}")
        return "\n".join(lines) if lines else "all keys loaded"


def read_state_dict(path: str, trusted: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a LOCAL weight file: ``.safetensors``, or a torch pickle (``.pth``/``.pt``/``.bin``).

    A pickle may hold the state dict itself or wrap it as ``{"model": ...}`` (ALBEF, DeiT) or
    ``{"state_dict": ...}``. Pickles go through the restricted unpickler (``pretrain.safe_loading``;
    ``trusted`` lifts it): a file is never executed.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weight file {path!r} does not exist; give a local .pth/.pt/.bin/.safetensors file")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file as load_safetensors

        try:
            return load_safetensors(path, device="cpu")
        except SafetensorError as error:
            raise UnsafeCheckpointError(f"{path} is not a readable safetensors file ({error})") from None
    loaded = load_file(path, trusted=trusted)
    for wrapper in ("model", "state_dict"):
        if isinstance(loaded, dict) and isinstance(loaded.get(wrapper), dict):
            loaded = loaded[wrapper]
            break
    if not isinstance(loaded, dict) or not all(isinstance(value, torch.Tensor) for value in loaded.values()):
        raise ValueError(f"{path!r} holds no state dict (expected a dict of tensors, or one under 'model')")
    return loaded
