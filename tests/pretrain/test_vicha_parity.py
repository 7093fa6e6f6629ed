"""ViCHA's numbers, reproduced: a small reference written here from ViCHA's definitions (its ``models/vit.py``,
``models/xbert.py`` in modes text/fusion/multi_modal, ``kw_img_ViCHA.forward``, ``hidden_states_ita`` and
``models/objectives/mae.py``) holds random tiny weights under ViCHA's own key names; the file it would save is
imported (``pretrain.importers.vicha``), and this project's model and objectives must give the same concept-
augmented image tokens, H-ITC term, ITM and MLM logits and MAE loss (same mask): fp32, eval mode, within 1e-5.
Export gives the released layout back, key for key and value for value.

Run: ``.venv/bin/python -m pytest -q tests/pretrain/test_vicha_parity.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.importers.vicha import VichaLayoutError, from_vicha_state_dict, to_vicha_state_dict
from pretrain.models.albef import from_albef_state_dict
from pretrain.objectives.base import BuildContext, StepContext
from pretrain.objectives.hitc import HierarchicalITC, HierarchicalITCConfig
from pretrain.objectives.mim import MaskedImageModelling, MaskedImageModellingConfig
from tests.pretrain.vicha_helpers import CAPTIONS, CONCEPTS, tiny_images

WIDTH, DEPTH, HEADS, PATCH, IMAGE = 32, 3, 2, 16, 32          # ViT
HIDDEN, LAYERS, FUSION, FFN, VOCAB = 32, 4, 2, 64, 30522       # BERT (2 text-only + 2 fusion layers)
KW_LAYERS, EMBED, DECODER = 2, 16, 32
GRID = IMAGE // PATCH

# ---------------------------------------------------------------------------------------------------------------
# The reference: plain functions over a dict of tensors named as ViCHA's state_dict names them.


def _linear(P, name, x):
    return x @ P[f"{name}.weight"].T + P[f"{name}.bias"]


def _layer_norm(P, name, x, eps):
    return F.layer_norm(x, x.shape[-1:], P[f"{name}.weight"], P[f"{name}.bias"], eps)


def _attention_weights(q, k, heads, additive=None):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if additive is not None:
        scores = scores + additive
    return scores.softmax(dim=-1)


def _split(x, heads):
    return x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def _merge(x):
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)


def vit_block(P, name, x, heads=HEADS, ln_eps=1e-6):
    """ViCHA's ``Block``: pre-norm attention (qkv with bias) and MLP (GELU), both residual."""
    h = _layer_norm(P, f"{name}.norm1", x, ln_eps)
    batch, length, width = h.shape
    qkv = _linear(P, f"{name}.attn.qkv", h).reshape(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    attended = _attention_weights(qkv[0], qkv[1], heads) @ qkv[2]
    x = x + _linear(P, f"{name}.attn.proj", attended.transpose(1, 2).reshape(batch, length, width))
    h = _layer_norm(P, f"{name}.norm2", x, ln_eps)
    return x + _linear(P, f"{name}.mlp.fc2", F.gelu(_linear(P, f"{name}.mlp.fc1", h)))


def vit(P, image, external=None, prefix="visual_encoder"):
    """``VisionTransformer.forward`` with ``return_hidden_state``: (final tokens, norm(x) after every block)."""
    x = F.conv2d(image, P[f"{prefix}.patch_embed.proj.weight"], P[f"{prefix}.patch_embed.proj.bias"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([P[f"{prefix}.cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + P[f"{prefix}.pos_embed"]
    if external is not None:
        x = torch.cat([x, external], dim=1)
    hidden = []
    for index in range(DEPTH):
        x = vit_block(P, f"{prefix}.blocks.{index}", x)
        hidden.append(_layer_norm(P, f"{prefix}.norm", x, 1e-6))
    return _layer_norm(P, f"{prefix}.norm", x, 1e-6), hidden


def bert_embeddings(P, name, ids):
    positions = torch.arange(ids.shape[1])
    x = (P[f"{name}.word_embeddings.weight"][ids] + P[f"{name}.position_embeddings.weight"][positions]
         + P[f"{name}.token_type_embeddings.weight"][torch.zeros_like(ids)])
    return _layer_norm(P, f"{name}.LayerNorm", x, 1e-12)


def _bert_attention(P, name, x, states, mask):
    q, k, v = (_split(_linear(P, f"{name}.self.{part}", source), HEADS)
               for part, source in (("query", x), ("key", states), ("value", states)))
    additive = (1.0 - mask[:, None, None, :].float()) * -10000.0  # xbert's extended attention mask
    attended = _merge(_attention_weights(q, k, HEADS, additive) @ v)
    return _layer_norm(P, f"{name}.output.LayerNorm", _linear(P, f"{name}.output.dense", attended) + x, 1e-12)


def bert_layer(P, name, x, mask, image=None, image_mask=None):
    """xbert's ``BertLayer``: self-attention, cross-attention to the image from ``fusion_layer`` on, FFN; post-LN."""
    x = _bert_attention(P, f"{name}.attention", x, x, mask)
    if image is not None:
        x = _bert_attention(P, f"{name}.crossattention", x, image, image_mask)
    h = F.gelu(_linear(P, f"{name}.intermediate.dense", x))
    return _layer_norm(P, f"{name}.output.LayerNorm", _linear(P, f"{name}.output.dense", h) + x, 1e-12)


def bert_text(P, name, ids, mask, layers):
    """Mode 'text': (last hidden state, hidden_states = (embeddings, output of layer 1, ...))."""
    x = bert_embeddings(P, f"{name}.embeddings", ids)
    states = [x]
    for index in range(layers):
        x = bert_layer(P, f"{name}.encoder.layer.{index}", x, mask)
        states.append(x)
    return x, states


def bert_fusion(P, name, x, mask, image):
    image_mask = torch.ones(image.shape[:2])  # ViCHA: image_atts all ones, concept padding included
    for index in range(FUSION, LAYERS):
        x = bert_layer(P, f"{name}.encoder.layer.{index}", x, mask, image, image_mask)
    return x


def mlm_logits(P, ids, mask, image):
    text, _ = bert_text(P, "text_encoder.bert", ids, mask, FUSION)
    x = bert_fusion(P, "text_encoder.bert", text, mask, image)
    head = "text_encoder.cls.predictions"
    h = _layer_norm(P, f"{head}.transform.LayerNorm", F.gelu(_linear(P, f"{head}.transform.dense", x)), 1e-12)
    return h @ P["text_encoder.bert.embeddings.word_embeddings.weight"].T + P[f"{head}.bias"]


def hidden_states_ita(P, image_hidden, text_hidden, temp):
    """ViCHA's ``hidden_states_ita`` on one process (the gathers are the local batch)."""
    total = 0.0
    for i, (image_state, text_state) in enumerate(zip(image_hidden, text_hidden, strict=True)):
        image_feat = F.normalize(_linear(P, f"vision_proj_hidden.{i}", image_state[:, 0]), dim=-1)
        text_feat = F.normalize(_linear(P, f"text_proj_hidden.{i}", text_state[:, 0]), dim=-1)
        sim_i2t, sim_t2i = image_feat @ text_feat.T / temp, text_feat @ image_feat.T / temp
        targets = torch.eye(sim_i2t.shape[0])
        loss_i2t = -(F.log_softmax(sim_i2t, dim=1) * targets).sum(1).mean()
        loss_t2i = -(F.log_softmax(sim_t2i, dim=1) * targets).sum(1).mean()
        total = total + (loss_i2t + loss_t2i) / 2
    return total


def mae_loss(P, image, mask_ratio=0.75):
    """``compute_mae(unimodal=True)``: random_masking, forward_encoder (bare cls_token), forward_decoder,
    forward_loss (norm_pix_loss) on the masked patches."""
    x = F.conv2d(image, P["visual_encoder.patch_embed.proj.weight"], P["visual_encoder.patch_embed.proj.bias"],
                 stride=PATCH).flatten(2).transpose(1, 2)
    x = x + P["visual_encoder.pos_embed"][:, 1:]
    n, length, dim = x.shape
    keep = int(length * (1 - mask_ratio))
    noise = torch.rand(n, length)
    shuffle = torch.argsort(noise, dim=1)
    restore = torch.argsort(shuffle, dim=1)
    x = torch.gather(x, 1, shuffle[:, :keep].unsqueeze(-1).repeat(1, 1, dim))
    mask = torch.ones(n, length)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, restore)
    x = torch.cat([P["visual_encoder.cls_token"].expand(n, -1, -1), x], dim=1)
    for index in range(DEPTH):
        x = vit_block(P, f"visual_encoder.blocks.{index}", x)
    x = _linear(P, "decoder_embed", _layer_norm(P, "visual_encoder.norm", x, 1e-6))
    tokens = P["mask_token"].repeat(n, restore.shape[1] + 1 - x.shape[1], 1)
    rest = torch.gather(torch.cat([x[:, 1:], tokens], dim=1), 1, restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1], rest], dim=1) + P["decoder_pos_embed"]
    x = vit_block(P, "decoder_blocks.0", x)
    prediction = _linear(P, "mae_proj", _layer_norm(P, "decoder_norm", x, 1e-5))[:, 1:]
    target = image.reshape(n, 3, GRID, PATCH, GRID, PATCH)
    target = torch.einsum("nchpwq->nhwpqc", target).reshape(n, GRID * GRID, PATCH * PATCH * 3)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1.0e-6) ** 0.5
    per_patch = ((prediction - target) ** 2).mean(-1)
    return (per_patch * mask).sum() / mask.sum()


def sincos_numpy_style(width, grid):
    """MAE's ``get_2d_sincos_pos_embed(cls_token=True)``, written out."""
    rows = []
    for i in range(grid):
        for j in range(grid):
            row = []
            for coordinate in (j, i):
                omega = [1.0 / 10000 ** (k / (width / 4)) for k in range(width // 4)]
                row += [math.sin(coordinate * w) for w in omega] + [math.cos(coordinate * w) for w in omega]
            rows.append(row)
    return torch.tensor([[0.0] * width] + rows).unsqueeze(0)


def released_state(seed=0):
    """Random weights under every key ViCHA's ``kw_img_ViCHA`` (return_hidden_state, mae, unimodal_mae) saves."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {}

    def vit_keys(prefix, depth, width):
        for index in range(depth):
            block = f"{prefix}.{index}"
            shapes.update({f"{block}.norm1.weight": (width,), f"{block}.norm1.bias": (width,),
                           f"{block}.attn.qkv.weight": (3 * width, width), f"{block}.attn.qkv.bias": (3 * width,),
                           f"{block}.attn.proj.weight": (width, width), f"{block}.attn.proj.bias": (width,),
                           f"{block}.norm2.weight": (width,), f"{block}.norm2.bias": (width,),
                           f"{block}.mlp.fc1.weight": (4 * width, width), f"{block}.mlp.fc1.bias": (4 * width,),
                           f"{block}.mlp.fc2.weight": (width, 4 * width), f"{block}.mlp.fc2.bias": (width,)})

    def bert_keys(prefix, layers, fusion, mlm):
        shapes.update({f"{prefix}.embeddings.word_embeddings.weight": (VOCAB, HIDDEN),
                       f"{prefix}.embeddings.position_embeddings.weight": (512, HIDDEN),
                       f"{prefix}.embeddings.token_type_embeddings.weight": (2, HIDDEN),
                       f"{prefix}.embeddings.LayerNorm.weight": (HIDDEN,),
                       f"{prefix}.embeddings.LayerNorm.bias": (HIDDEN,)})
        for index in range(layers):
            layer = f"{prefix}.encoder.layer.{index}"
            parts = ["attention"] + (["crossattention"] if index >= fusion else [])
            for part in parts:
                width = WIDTH if part == "crossattention" else HIDDEN
                shapes.update({f"{layer}.{part}.self.query.weight": (HIDDEN, HIDDEN),
                               f"{layer}.{part}.self.query.bias": (HIDDEN,),
                               f"{layer}.{part}.self.key.weight": (HIDDEN, width),
                               f"{layer}.{part}.self.key.bias": (HIDDEN,),
                               f"{layer}.{part}.self.value.weight": (HIDDEN, width),
                               f"{layer}.{part}.self.value.bias": (HIDDEN,),
                               f"{layer}.{part}.output.dense.weight": (HIDDEN, HIDDEN),
                               f"{layer}.{part}.output.dense.bias": (HIDDEN,),
                               f"{layer}.{part}.output.LayerNorm.weight": (HIDDEN,),
                               f"{layer}.{part}.output.LayerNorm.bias": (HIDDEN,)})
            shapes.update({f"{layer}.intermediate.dense.weight": (FFN, HIDDEN),
                           f"{layer}.intermediate.dense.bias": (FFN,),
                           f"{layer}.output.dense.weight": (HIDDEN, FFN), f"{layer}.output.dense.bias": (HIDDEN,),
                           f"{layer}.output.LayerNorm.weight": (HIDDEN,), f"{layer}.output.LayerNorm.bias": (HIDDEN,)})
        if mlm:
            head = prefix.replace(".bert", ".cls.predictions")
            shapes.update({f"{head}.bias": (VOCAB,), f"{head}.transform.dense.weight": (HIDDEN, HIDDEN),
                           f"{head}.transform.dense.bias": (HIDDEN,), f"{head}.transform.LayerNorm.weight": (HIDDEN,),
                           f"{head}.transform.LayerNorm.bias": (HIDDEN,)})

    for suffix in ("", "_m"):
        shapes.update({f"visual_encoder{suffix}.cls_token": (1, 1, WIDTH),
                       f"visual_encoder{suffix}.pos_embed": (1, 1 + GRID * GRID, WIDTH),
                       f"visual_encoder{suffix}.patch_embed.proj.weight": (WIDTH, 3, PATCH, PATCH),
                       f"visual_encoder{suffix}.patch_embed.proj.bias": (WIDTH,),
                       f"visual_encoder{suffix}.norm.weight": (WIDTH,), f"visual_encoder{suffix}.norm.bias": (WIDTH,)})
        vit_keys(f"visual_encoder{suffix}.blocks", DEPTH, WIDTH)
        bert_keys(f"text_encoder{suffix}.bert", LAYERS, FUSION, mlm=True)
        bert_keys(f"kw_encoder{suffix}", KW_LAYERS, KW_LAYERS, mlm=False)
        shapes.update({f"kw_proj{suffix}.weight": (WIDTH, HIDDEN), f"kw_proj{suffix}.bias": (WIDTH,),
                       f"vision_proj{suffix}.weight": (EMBED, WIDTH), f"vision_proj{suffix}.bias": (EMBED,),
                       f"text_proj{suffix}.weight": (EMBED, HIDDEN), f"text_proj{suffix}.bias": (EMBED,)})
    for i in range(2):
        shapes.update({f"vision_proj_hidden.{i}.weight": (EMBED, WIDTH), f"vision_proj_hidden.{i}.bias": (EMBED,),
                       f"text_proj_hidden.{i}.weight": (EMBED, HIDDEN), f"text_proj_hidden.{i}.bias": (EMBED,)})
    shapes.update({"itm_head.weight": (2, HIDDEN), "itm_head.bias": (2,), "mask_token": (1, 1, DECODER),
                   "decoder_embed.weight": (DECODER, WIDTH), "decoder_embed.bias": (DECODER,),
                   "decoder_norm.weight": (DECODER,), "decoder_norm.bias": (DECODER,),
                   "mae_proj.weight": (PATCH * PATCH * 3, DECODER), "mae_proj.bias": (PATCH * PATCH * 3,),
                   "image_queue": (EMBED, 8), "text_queue": (EMBED, 8)})
    vit_keys("decoder_blocks", 1, DECODER)
    state = {}
    for key, shape in shapes.items():
        value = torch.randn(shape, generator=generator) * 0.2
        if key.endswith(("norm1.weight", "norm2.weight", "norm.weight", "LayerNorm.weight")):
            value = 1.0 + value
        state[key] = value
    state["temp"] = torch.tensor(0.07)
    state["queue_ptr"] = torch.zeros(1, dtype=torch.long)
    state["decoder_pos_embed"] = sincos_numpy_style(DECODER, GRID)
    for prefix in ("text_encoder.bert", "text_encoder_m.bert", "kw_encoder", "kw_encoder_m"):
        state[f"{prefix}.embeddings.position_ids"] = torch.arange(512).unsqueeze(0)
    for prefix in ("text_encoder", "text_encoder_m"):  # the tied MLM decoder, saved under both names
        state[f"{prefix}.cls.predictions.decoder.weight"] = state[f"{prefix}.bert.embeddings.word_embeddings.weight"]
        state[f"{prefix}.cls.predictions.decoder.bias"] = state[f"{prefix}.cls.predictions.bias"]
    return state


# ---------------------------------------------------------------------------------------------------------------
# This project's side, built from the same file.

def ours(state):
    from pretrain.build import build_backbone
    from tests.pretrain.vicha_helpers import tiny_model_config

    config = tiny_model_config(depth=DEPTH, text_layers=FUSION, concept_layers=KW_LAYERS, embed_dim=EMBED,
                               vision_overrides={"depth": DEPTH, "embed_dim": WIDTH, "num_heads": HEADS},
                               text_overrides={"num_hidden_layers": LAYERS, "hidden_size": HIDDEN,
                                               "num_attention_heads": HEADS, "intermediate_size": FFN})
    model, tokenizer = build_backbone(config)
    model_state, momentum, queues = from_albef_state_dict(state)
    heads = {name: value for name, value in model_state.items() if name.startswith("objectives.")}
    model.load_state_dict({name: value for name, value in model_state.items() if name not in heads})  # strict
    build = BuildContext(model, tokenizer, 4, 10, 0.0)
    # ViCHA's rule, image_hidden_states[-(n+1):-1] and hidden_states[-(n+1):-1] with n = 2: blocks 1, 2 of 3 and,
    # of the text states (embeddings, layer 1, layer 2), the embeddings and layer 1.
    hitc = HierarchicalITC(HierarchicalITCConfig(image_layers=(1, 2), text_layers=(0, 1)), build)
    mim = MaskedImageModelling(MaskedImageModellingConfig(decoder_depth=1, decoder_width=DECODER, decoder_heads=HEADS),
                               build)
    for name, module in (("hitc", hitc), ("mim", mim)):
        prefix = f"objectives.{name}."
        module.load_state_dict({key[len(prefix):]: value for key, value in heads.items() if key.startswith(prefix)})
    assert set(momentum) and {"image_queue", "text_queue", "queue_ptr"} == set(queues)
    return model.eval(), tokenizer, hitc.eval(), mim.eval()


@pytest.fixture(scope="module")
def pair():
    state = released_state()
    return state, *ours(state)


def test_every_term_equals_vichas_own_computation(pair):
    state, model, tokenizer, hitc, mim = pair
    P = {key: value.float() for key, value in state.items()}
    images = tiny_images()
    text = tokenizer(CAPTIONS)
    concepts = tokenizer([" ".join(words) for words in CONCEPTS])
    ids, mask = text["input_ids"], text["attention_mask"]
    with torch.no_grad():
        # ViCHA: kw_encoder in mode 'text', kw_proj, appended after the position embedding.
        kw = _linear(P, "kw_proj", bert_text(P, "kw_encoder", concepts["input_ids"], concepts["attention_mask"],
                                             KW_LAYERS)[0])
        image_embeds, image_hidden = vit(P, images, external=kw)
        text_embeds, text_hidden = bert_text(P, "text_encoder.bert", ids, mask, FUSION)
        encoded = model.encode(images, ids, mask, hitc.needs().wants,
                               (concepts["input_ids"], concepts["attention_mask"]))
        assert encoded.image_tokens.shape == (4, 1 + GRID * GRID + concepts["input_ids"].shape[1], WIDTH)
        assert torch.allclose(encoded.concept_tokens, kw, atol=1e-5)
        assert torch.allclose(encoded.image_tokens, image_embeds, atol=1e-5)
        assert torch.allclose(encoded.text_hidden, text_embeds, atol=1e-5)

        # Hierarchical ITC: image_hidden_states[-(n+1):-1] with text hidden_states[-(n+1):-1], n = 2.
        step = StepContext(step=0, alpha=0.0, model=model, momentum=None, training=False)
        expected = hidden_states_ita(P, image_hidden[-3:-1], text_hidden[-3:-1], P["temp"])
        assert hitc(encoded, None, {}, step)["hitc"].item() == pytest.approx(expected.item(), abs=1e-5)

        # ITM: the fusion layers on (text, image) pairs, itm_head on the fused [CLS]; pairs shuffled as negatives.
        order = torch.tensor([1, 2, 3, 0])
        for image_rows in (torch.arange(4), order):
            fused = bert_fusion(P, "text_encoder.bert", text_embeds, mask, image_embeds[image_rows])
            itm = _linear(P, "itm_head", fused[:, 0])
            ours_itm = model.itm_head(model.fused_cls(encoded.text_hidden, mask, encoded.image_tokens[image_rows]))
            assert torch.allclose(ours_itm, itm, atol=1e-5)

        # MLM logits on masked ids (the multi_modal pass attending to the concept-augmented image tokens).
        masked = ids.clone()
        masked[:, 1] = tokenizer.mask_token_id
        reference_logits = mlm_logits(P, masked, mask, image_embeds)
        ours_logits = model.text_encoder.mlm_logits(model.text_encoder(masked, mask, encoded.image_tokens))
        assert torch.allclose(ours_logits, reference_logits, atol=1e-5)

        # MAE with the same mask: both draw torch.rand(B, N) from the same seed.
        torch.manual_seed(7)
        reference_mae = mae_loss(P, images)
        torch.manual_seed(7)
        assert mim(encoded, None, {"image": images}, step)["mim"].item() == pytest.approx(reference_mae.item(),
                                                                                           abs=1e-5)


def test_export_gives_the_released_layout_back_key_for_key(pair):
    state, model, _, hitc, mim = pair
    imported, report = from_vicha_state_dict(state)
    assert len(report.dropped) == 3  # decoder_pos_embed and the concept encoders' position ids, checked
    back = to_vicha_state_dict(imported)
    released = {key: value for key, value in state.items()
                if not key.startswith(("text_encoder.bert.embeddings.position_ids", "text_encoder_m.bert.embeddings"
                                                                                   ".position_ids"))}
    assert set(back) - {"text_encoder.bert.embeddings.position_ids", "text_encoder_m.bert.embeddings.position_ids"} \
        == set(released)
    for key, value in released.items():
        assert torch.allclose(back[key].float(), value.float(), atol=1e-6), key
    # From this project's modules: the model, the momentum copies and the heads, as pretrain.export writes them.
    exported = {**{name: value for name, value in model.state_dict().items()},
                **{f"objectives.hitc.{name}": value for name, value in hitc.state_dict().items()},
                **{f"objectives.mim.{name}": value for name, value in mim.state_dict().items()}}
    exported["temp"] = exported["temp"].reshape(())
    released_again = to_vicha_state_dict(exported)
    assert torch.equal(released_again["kw_proj.weight"], state["kw_proj.weight"])
    assert torch.allclose(released_again["decoder_pos_embed"], state["decoder_pos_embed"], atol=1e-6)


def test_keys_outside_the_layout_and_wrong_fixed_tables_are_named():
    state = released_state()
    with pytest.raises(VichaLayoutError, match="mae_proj_uni.weight"):
        from_vicha_state_dict({**state, "mae_proj_uni.weight": torch.zeros(1)})
    with pytest.raises(VichaLayoutError, match="decoder_pos_embed is not the fixed 2-D sin-cos table"):
        from_vicha_state_dict({**state, "decoder_pos_embed": state["decoder_pos_embed"] + 1})
