"""Tests of pretrain/models/vision.py: token output, SDPA attention, ALBEF's pos_embed interpolation, the weight loader,
and the composable steps (chosen layers, extra tokens, kept patches, masked attention, region features), each
against a direct computation from timm's parts.

Tiny ViTs (width 32-64, depth 2-12, 32-96 px) on CPU; run with ``pytest tests/pretrain/models/test_vision.py``.
"""

from __future__ import annotations

import pytest
import timm
import timm.layers
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from safetensors.torch import save_file

from pretrain.models.vision import VisionOutput, build_vision_encoder, interpolate_pos_embed, load_vision_weights

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


# The composable steps. Reference computations below use timm's own parts (patch_embed, _pos_embed, blocks, norm)
# or forward_intermediates, never the code under test.


def embedded(encoder, images):
    """State 0 computed from timm's parts: patches, CLS, position embeddings."""
    return encoder._pos_embed(encoder.patch_embed(images))


def blocks_then_norm(encoder, tokens, blocks=None):
    for block in encoder.blocks if blocks is None else blocks:
        tokens = block(tokens)
    return encoder.norm(tokens)


def block_by_hand(block, tokens, key_mask):
    """One timm block with attention written out: scores, -inf on the keys ``key_mask`` [B, S] forbids, softmax."""
    attention = block.attn
    batch, length, width = tokens.shape
    qkv = attention.qkv(block.norm1(tokens)).reshape(batch, length, 3, attention.num_heads, attention.head_dim)
    query, key, value = qkv.permute(2, 0, 3, 1, 4)
    query, key = attention.q_norm(query), attention.k_norm(key)
    scores = (query @ key.transpose(-2, -1)) * attention.scale
    scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    mixed = (scores.softmax(dim=-1) @ value).transpose(1, 2).reshape(batch, length, width)
    tokens = tokens + block.ls1(attention.proj(attention.norm(mixed)))
    return tokens + block.ls2(block.mlp(block.norm2(tokens)))


def random_key_mask(batch, length, generator):
    mask = torch.rand(batch, length, generator=generator) < 0.4
    mask[:, 0] = True  # CLS stays attendable, as region_attention_mask makes it
    mask[-1, 1:] = False  # one row that may read CLS only
    return mask


def test_grid_and_patch_size():
    encoder = tiny_encoder(64)
    assert (encoder.grid_size, encoder.patch_size) == ((4, 4), (16, 16))
    assert encoder.encode(torch.randn(1, 3, 64, 64)).grid == (4, 4)


def test_state_dict_names_and_shapes_are_timm_s():
    ours = tiny_encoder(64).state_dict()
    timm_model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=0, global_pool="", **TINY
    )
    assert {key: value.shape for key, value in ours.items()} == {
        key: value.shape for key, value in timm_model.state_dict().items()
    }


@pytest.mark.parametrize("mode", ["eval", "train with dropout", "train with checkpointing"])
def test_encode_without_options_is_forward_bit_for_bit(mode):
    encoder = tiny_encoder(64, drop_path_rate=0.2, pos_drop_rate=0.1, proj_drop_rate=0.1)
    encoder.train(mode != "eval")
    encoder.set_grad_checkpointing(mode == "train with checkpointing")
    images = torch.randn(2, 3, 64, 64)
    torch.manual_seed(1)
    expected = encoder(images)
    torch.manual_seed(1)
    output = encoder.encode(images)
    assert isinstance(output, VisionOutput)
    assert torch.equal(output.tokens, expected)
    assert output.layers == {} and output.region_tokens is None


def test_layers_are_forward_intermediates_states():
    encoder = tiny_encoder(64, depth=3)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        output = encoder.encode(images, layers=(0, 1, 2, 3))
        normed = encoder.encode(images, layers=(2, 3), norm_layers=True)
        for norm in (False, True):
            final, intermediates = encoder.forward_intermediates(
                images, indices=[0, 1, 2], norm=norm, output_fmt="NLC", return_prefix_tokens=True
            )
            taken = output if not norm else normed
            for block, (patches, prefix) in enumerate(intermediates, start=1):
                if block in taken.layers:
                    assert torch.equal(taken.layers[block], torch.cat([prefix, patches], dim=1))
        assert torch.equal(output.layers[0], embedded(encoder, images))
        assert torch.equal(output.tokens, final)
        assert torch.equal(normed.layers[3], normed.tokens)  # the last state normed is the output


def test_vicha_hierarchical_layers_are_normed_outputs_of_blocks_7_to_11():
    encoder = tiny_encoder(32, embed_dim=32, depth=12)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        # ViCHA's ViT keeps norm(x) after each of its 12 blocks; its hierarchical ITC reads entries [-6:-1].
        tokens, hidden_states = embedded(encoder, images), []
        for block in encoder.blocks:
            tokens = block(tokens)
            hidden_states.append(encoder.norm(tokens))
        output = encoder.encode(images, layers=(7, 8, 9, 10, 11), norm_layers=True)
    for index, state in zip((7, 8, 9, 10, 11), hidden_states[-6:-1], strict=True):
        torch.testing.assert_close(output.layers[index], state, rtol=0, atol=0)


def test_keeping_every_patch_in_order_is_the_plain_forward():
    encoder = tiny_encoder(64)
    images = torch.randn(2, 3, 64, 64)
    keep = torch.arange(16).expand(2, -1)
    with torch.no_grad():
        assert torch.equal(encoder.encode(images, keep=keep).tokens, encoder(images))


def test_kept_patches_keep_their_positions_and_cls_stays_first():
    encoder = tiny_encoder(64)
    images = torch.randn(2, 3, 64, 64)
    keep = torch.tensor([[3, 0, 7, 12], [15, 2, 9, 1]])
    with torch.no_grad():
        output = encoder.encode(images, keep=keep)
        full = embedded(encoder, images)
        for sample in range(2):
            sequence = torch.cat([full[sample, :1], full[sample, 1 + keep[sample]]])[None]
            torch.testing.assert_close(output.tokens[sample : sample + 1], blocks_then_norm(encoder, sequence))
        # A dropped patch's pixels do not reach the output: patch 5 (row 1, column 1) is kept by neither sample.
        changed = images.clone()
        changed[:, :, 16:32, 16:32] = torch.randn(2, 3, 16, 16)
        assert torch.equal(encoder.encode(changed, keep=keep).tokens, output.tokens)
    assert output.tokens.shape == (2, 1 + 4, 64)


def test_extra_tokens_are_appended_without_position_embedding_and_seen_by_every_block():
    encoder = tiny_encoder(64)
    images, extra = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64)
    with torch.no_grad():
        tokens = encoder.embed(images, extra_tokens=extra)
        output = encoder.encode(images, extra_tokens=extra, layers=(1,))
        expected_input = torch.cat([embedded(encoder, images), extra], dim=1)
        expected = blocks_then_norm(encoder, expected_input)
        expected_first = encoder.blocks[0](expected_input)
        alone = encoder(images)
    assert torch.equal(tokens[:, -3:], extra)
    assert torch.equal(tokens, expected_input)
    assert output.tokens.shape == (2, 1 + 16 + 3, 64)
    torch.testing.assert_close(output.tokens, expected)
    torch.testing.assert_close(output.layers[1], expected_first)
    assert not torch.allclose(output.tokens[:, 0], alone[:, 0])  # the image tokens attend to the extra ones


def test_masked_run_blocks_is_attention_by_hand_with_minus_infinity_on_masked_keys():
    encoder = tiny_encoder(64, depth=3)
    images = torch.randn(3, 3, 64, 64)
    mask = random_key_mask(3, 17, torch.Generator().manual_seed(0))
    with torch.no_grad():
        after_first = encoder.blocks[0](encoder.embed(images))
        hidden, states = encoder.run_blocks(after_first, 1, 3, attention_mask=mask, layers=(1, 2))
        assert states[1] is after_first  # the state the call starts from, returned as given
        expected = after_first
        expected = block_by_hand(encoder.blocks[1], expected, mask)
        torch.testing.assert_close(states[2], expected)
        expected = block_by_hand(encoder.blocks[2], expected, mask)
    torch.testing.assert_close(hidden, expected)


def test_encode_regions_matches_x_vlm_joint_pass_with_additive_mask():
    encoder = tiny_encoder(64, depth=4)
    images = torch.randn(2, 3, 64, 64)
    image_index = torch.tensor([0, 1, 1, 0, 1])
    mask = random_key_mask(5, 17, torch.Generator().manual_seed(1))
    with torch.no_grad():
        output = encoder.encode_regions(images, image_index, mask, masked_blocks=2)
        # X-VLM's ViT: images run blocks 1..2 once; region copies are gathered and stacked before the images;
        # the last 2 blocks run on the stack with (1 - atts) * -10000 added to every query's scores.
        shared = embedded(encoder, images)
        for block in encoder.blocks[:2]:
            shared = block(shared)
        stack = torch.cat([shared[image_index], shared])
        atts = torch.cat([mask.float(), torch.ones(2, 17)])
        bias = ((1.0 - atts) * -10000.0)[:, None, None, :]
        for block in encoder.blocks[2:]:
            stack = block(stack, attn_mask=bias)
        regions, whole = encoder.norm(stack).split([5, 2])
    torch.testing.assert_close(output.region_tokens, regions)
    torch.testing.assert_close(output.tokens, whole)
    torch.testing.assert_close(output.tokens, encoder(images))
    assert output.grid == (4, 4)


def test_gradient_checkpointing_covers_every_block_on_every_path(monkeypatch):
    encoder = tiny_encoder(64, depth=3).train()
    images, extra = torch.randn(2, 3, 64, 64), torch.randn(2, 2, 64)
    keep = torch.tensor([[0, 5, 9], [4, 1, 15]])
    image_index = torch.tensor([1, 0, 1])
    mask = random_key_mask(3, 17, torch.Generator().manual_seed(2))

    def loss_and_gradients():
        output = encoder.encode(images, layers=(1, 2), extra_tokens=extra, keep=keep)
        regions = encoder.encode_regions(images, image_index, mask, masked_blocks=2)
        loss = (
            output.tokens.square().sum()
            + output.layers[1].sum()
            + regions.region_tokens[:, 0].square().sum()
            + regions.tokens.sum()
        )
        return loss, torch.autograd.grad(loss, list(encoder.parameters()))

    plain = loss_and_gradients()
    calls = []
    original = torch.utils.checkpoint.checkpoint

    def counting_checkpoint(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting_checkpoint)
    encoder.set_grad_checkpointing(True)
    checkpointed = loss_and_gradients()
    assert len(calls) == 3 + (1 + 2 + 2)  # encode: 3 blocks; regions: 1 shared, 2 for images, 2 for regions
    torch.testing.assert_close(checkpointed[0], plain[0])
    for ours, reference in zip(checkpointed[1], plain[1], strict=True):
        torch.testing.assert_close(ours, reference)


def test_option_errors_name_the_option_and_the_fix():
    encoder = tiny_encoder(64)
    images = torch.randn(2, 3, 64, 64)
    tokens = encoder.embed(images)
    with pytest.raises(ValueError, match=r"layers \[5\].*up to 2"):
        encoder.encode(images, layers=(1, 5))
    with pytest.raises(ValueError, match=r"layers \[0\].*blocks 2\.\.2"):
        encoder.run_blocks(tokens, 1, 2, layers=(0,))
    with pytest.raises(ValueError, match="start <= stop"):
        encoder.run_blocks(tokens, 2, 1)
    with pytest.raises(ValueError, match="int64"):
        encoder.encode(images, keep=torch.zeros(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"0\.\.15"):
        encoder.encode(images, keep=torch.tensor([[0, 16], [1, 2]]))
    with pytest.raises(ValueError, match="patch_drop_rate"):
        tiny_encoder(64, patch_drop_rate=0.5).encode(images, keep=torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"extra_tokens.*\[2, E, 64\]"):
        encoder.encode(images, extra_tokens=torch.randn(2, 3, 32))
    with pytest.raises(ValueError, match="bool tensor"):
        encoder.run_blocks(tokens, attention_mask=torch.ones(2, 17))
    with pytest.raises(ValueError, match=r"rows \[1\] allow no token"):
        encoder.run_blocks(tokens, attention_mask=torch.tensor([[True] * 17, [False] * 17]))
    with pytest.raises(ValueError, match=r"one of the 2 images"):
        encoder.encode_regions(images, torch.tensor([0, 2]), torch.ones(2, 17, dtype=torch.bool), masked_blocks=1)
    with pytest.raises(ValueError, match=r"masked_blocks must be in 1\.\.2"):
        encoder.encode_regions(images, torch.tensor([0]), torch.ones(1, 17, dtype=torch.bool), masked_blocks=3)
