"""Bad checkpoints given to ``--checkpoint``: each is refused with a message naming the file, in-process.

The slower cases that run an entry point (an empty split, a checkpoint with the wrong keys) are pinned in
test_loop.py and test_retrieval.py; these open the checkpoint the way every task does.
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file as load_safetensors

from finetune import checkpoints
from pretrain.config import resolve_path
from pretrain.models.albef import build_albef
from tests.pretrain.conftest import TINY_MODEL


class _RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _open(path, trusted=False):
    return checkpoints.backbone_state(checkpoints.open_checkpoint(str(path), trusted), num_patches=None)


def test_a_pth_that_is_no_torch_file_is_named(tmp_path):
    path = tmp_path / "ALBEF.pth"
    path.write_bytes(b"<html>404 Not Found</html>")  # what a failed download leaves behind
    with pytest.raises(checkpoints.CheckpointError,
                       match=rf"cannot read checkpoint {path} \(file\): {path} is not a PyTorch checkpoint file"):
        _open(path)


def test_a_broken_safetensors_file_is_named(tmp_path):
    path = tmp_path / "albef.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(checkpoints.CheckpointError, match=rf"{path} is not a readable safetensors file"):
        _open(path)


def test_a_released_pth_that_runs_code_is_refused_unless_trusted(tmp_path, tiny_checkpoint):
    marker, path = tmp_path / "ran", tmp_path / "ALBEF.pth"
    torch.save({"model": load_safetensors(tiny_checkpoint), "config": _RunsCode(marker)}, path)
    with pytest.raises(checkpoints.CheckpointError, match=rf"refusing to open {path}: it holds the Python object "
                                                          r"posix.system.*--trust-checkpoint"):
        _open(path)
    assert not marker.exists()
    assert "visual_encoder.pos_embed" in _open(path, trusted=True)
    assert marker.exists()  # the user vouched for the file, and it ran what it carried


def test_a_released_pth_without_code_loads_restricted(tmp_path, tiny_checkpoint):
    """ALBEF's files: {"model": tensors, "config": plain values, "epoch": int} need nothing beyond the allowlist."""
    path = tmp_path / "ALBEF.pth"
    torch.save({"model": load_safetensors(tiny_checkpoint), "config": {"lr": 1e-4, "betas": (0.9, 0.98)},
                "epoch": 29}, path)
    assert "text_encoder.bert.embeddings.word_embeddings.weight" in _open(path)


def test_a_checkpoint_with_wrong_keys_lists_them(tiny_checkpoint):
    model = build_albef(TINY_MODEL["vision"], TINY_MODEL["image_size"], resolve_path(TINY_MODEL["bert_dir"]),
                        TINY_MODEL["fusion_layer"], embed_dim=TINY_MODEL["embed_dim"],
                        vision_overrides=TINY_MODEL["vision_overrides"], text_overrides=TINY_MODEL["text_overrides"])
    state = _open(tiny_checkpoint)
    del state["itm_head.bias"]
    state["extra_head.weight"] = torch.zeros(1)
    state["vision_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(checkpoints.CheckpointError) as error:
        checkpoints.load_matching(model, state, source="tiny.safetensors")
    assert str(error.value) == (
        "tiny.safetensors does not fit the configured model (check model.* in the config against the checkpoint's "
        "config.yaml):\n  missing (1): itm_head.bias\n  unexpected (1): extra_head.weight\n"
        "  shape mismatch (checkpoint vs model) (1): vision_proj.weight [3, 3] vs [32, 64]")
