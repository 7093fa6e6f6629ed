"""Tests of pretrain/models/vision.py: token output, SDPA attention, ALBEF's pos_embed interpolation, the weight loader.

Tiny ViTs (width 32-64, depth 2, 32-96 px) on CPU; run with ``pytest tests/pretrain/models/test_vision.py``.
"""

from __future__ import annotations

import pytest
import timm.layers
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from pretrain.models.vision import build_vision_encoder, interpolate_pos_embed, load_vision_weights

TINY = {"embed_dim": 64, "depth": 2, "num_heads": 2}


def tiny_encoder(image_size: int, **overrides):
    torch.manual_seed(0)
    return build_vision_encoder("vit_tiny_patch16_224", image_size, **{**TINY, **overrides}).eval()


def test_forward_returns_all_tokens_cls_first_after_final_norm():
    encoder = tiny_encoder(64)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = encoder(images)
        # The ViT computed step by step from its parts: patches, CLS prepended, positions, blocks, final norm.
        patches = encoder.patch_embed(images)
        hidden = torch.cat([encoder.cls_token.expand(2, -1, -1), patches], dim=1) + encoder.pos_embed
        for block in encoder.blocks:
            hidden = block(hidden)
        expected = encoder.norm(hidden)
    assert tokens.shape == (2, 1 + 16, 64)
    assert (encoder.width, encoder.num_patches) == (64, 16)
    torch.testing.assert_close(tokens, expected)


def test_state_dict_has_timm_names_without_prefix():
    keys = set(tiny_encoder(32).state_dict())
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.1.attn.qkv.bias", "norm.weight"} <= keys
    assert not any(key.startswith(("head", "model.", "fc_norm")) for key in keys)


def test_attention_uses_sdpa_even_when_timm_default_is_off(monkeypatch):
    timm.layers.set_fused_attn(False)
    try:
        encoder = tiny_encoder(32)
    finally:
        timm.layers.set_fused_attn(True)
    calls = []
    original = F.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting_sdpa)
    with torch.no_grad():
        encoder(torch.randn(1, 3, 32, 32))
    assert len(calls) == TINY["depth"]


def test_unsupported_model_name_is_a_clear_error():
    with pytest.raises(ValueError, match="resnet18"):
        build_vision_encoder("resnet18", 64)


def test_interpolate_pos_embed_matches_per_channel_bicubic():
    torch.manual_seed(0)
    pos_embed = torch.randn(1, 1 + 16, 5)
    resized = interpolate_pos_embed(pos_embed, 36)
    assert resized.shape == (1, 1 + 36, 5)
    torch.testing.assert_close(resized[:, 0], pos_embed[:, 0], rtol=0, atol=0)
    for channel in range(5):
        grid = pos_embed[0, 1:, channel].reshape(1, 1, 4, 4)  # row-major patch order: row, then column
        expected = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False).reshape(36)
        torch.testing.assert_close(resized[0, 1:, channel], expected)


def test_interpolate_pos_embed_keeps_constant_grid_and_is_identity_at_same_size():
    constant = torch.full((1, 1 + 9, 3), 0.25)
    torch.testing.assert_close(interpolate_pos_embed(constant, 25), torch.full((1, 26, 3), 0.25))
    pos_embed = torch.randn(1, 17, 4)
    assert interpolate_pos_embed(pos_embed, 16) is pos_embed
    with pytest.raises(ValueError, match="square"):
        interpolate_pos_embed(pos_embed, 20)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_saved_at_64_px_load_into_96_px_encoder(tmp_path, suffix):
    small = tiny_encoder(64)
    state = {key: value.clone() for key, value in small.state_dict().items()}
    state["head.weight"], state["head.bias"] = torch.randn(10, 64), torch.randn(10)
    path = tmp_path / f"vit{suffix}"
    if suffix == ".pth":
        torch.save({"model": state}, path)  # DeiT / ALBEF wrap the weights under "model"
    else:
        save_file(state, str(path))

    large = tiny_encoder(96)
    report = load_vision_weights(large, str(path))

    assert report.dropped == ("head.bias", "head.weight")
    assert report.resized == ("pos_embed",)
    assert report.clean and not report.expected_missing
    assert large.pos_embed.shape == (1, 1 + 36, 64)
    torch.testing.assert_close(large.pos_embed[:, 0], small.pos_embed[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(large.pos_embed, interpolate_pos_embed(small.pos_embed, 36))
    for key, value in small.state_dict().items():
        if key != "pos_embed":
            torch.testing.assert_close(large.state_dict()[key], value, rtol=0, atol=0)


def test_shape_mismatch_lists_the_keys(tmp_path):
    path = tmp_path / "wide.pth"
    torch.save(tiny_encoder(32, embed_dim=32).state_dict(), path)
    with pytest.raises(ValueError, match=r"shape mismatches:[\s\S]*blocks\.0\.attn\.qkv\.weight"):
        load_vision_weights(tiny_encoder(32), str(path))


def test_missing_and_unexpected_keys_error_unless_not_strict(tmp_path):
    state = tiny_encoder(32).state_dict()
    del state["norm.weight"]
    state["dist_token"] = torch.zeros(1, 1, 64)
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match="norm.weight"):
        load_vision_weights(tiny_encoder(32), str(path))
    report = load_vision_weights(tiny_encoder(32), str(path), strict=False)
    assert (report.missing, report.unexpected) == (("norm.weight",), ("dist_token",))


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        load_vision_weights(tiny_encoder(32), str(tmp_path / "nothing.pth"))
