"""Tests for pretrain/models/concepts.py and the concept path through the backbone and the momentum side.

Run: ``.venv/bin/python -m pytest -q tests/pretrain/models/test_concepts.py``.
"""

from __future__ import annotations

import pytest
import torch

from pretrain.models.concepts import ConceptBatch, concept_lists
from pretrain.models.encoded import Wants, encode, momentum_towers
from pretrain.objectives.momentum import MomentumCopy
from pretrain.schema import ConceptConfig
from tests.pretrain.vicha_helpers import CAPTIONS, CONCEPTS, tiny_backbone, tiny_images


def _batch(train: bool, fraction: float | None = 0.5, seed: int = 0):
    model, tokenizer = tiny_backbone(concept_layers=2)
    adapter = ConceptBatch(tokenizer, ConceptConfig(layers=2, max_length=12, sample_fraction=fraction), train)
    metas = [{"concepts": words} for words in CONCEPTS]
    return model, tokenizer, adapter, adapter.texts(["k0", "k1", "k2", "k3"], metas, [seed] * 4)


def test_concept_encoder_starts_as_the_text_encoders_embeddings_and_first_layers():
    model, _ = tiny_backbone(concept_layers=2)
    concept, text = model.concept_encoder.text.bert, model.text_encoder.bert
    assert all(torch.equal(value, text.embeddings.state_dict()[name])
               for name, value in concept.embeddings.state_dict().items())
    for index in range(2):
        source = text.encoder.layer[index].state_dict()
        copied = concept.encoder.layer[index].state_dict()
        assert all(torch.equal(value, source[name]) for name, value in copied.items())
    assert len(concept.encoder.layer) == 2 and model.concept_encoder.proj.out_features == model.visual_encoder.width


def test_training_draws_a_fraction_with_replacement_and_evaluation_takes_every_concept():
    _, _, _, train_texts = _batch(train=True)
    for text, words in zip(train_texts, CONCEPTS, strict=True):
        drawn = text.split(" ")
        assert len(drawn) == max(1, int(0.5 * len(words))) and set(drawn) <= set(words)
    assert _batch(train=True)[3] == train_texts                          # seeded by key and image digest
    assert any(_batch(train=True, seed=seed)[3] != train_texts for seed in range(1, 6))
    assert _batch(train=False)[3] == [" ".join(words) for words in CONCEPTS]
    assert _batch(train=True, fraction=None)[3] == [" ".join(words) for words in CONCEPTS]


def test_concept_tokens_are_cls_then_the_words_as_captions_are_tokenised_and_draws_follow_the_pixels():
    _, tokenizer, adapter, _ = _batch(train=False)
    batch = adapter({"__key__": ["k0", "k1", "k2", "k3"], "meta": [{"concepts": words} for words in CONCEPTS]})
    expected = tokenizer([" ".join(words) for words in CONCEPTS])
    assert torch.equal(batch["concept_ids"], expected["input_ids"][:, :12])
    assert torch.equal(batch["concept_mask"], expected["attention_mask"][:, :12])
    _, _, train_adapter, _ = _batch(train=True)
    metas = [{"concepts": [f"word{i}" for i in range(10)]}] * 4
    first = train_adapter({"__key__": ["k"] * 4, "meta": metas, "image": tiny_images(seed=1)})
    again = train_adapter({"__key__": ["k"] * 4, "meta": metas, "image": tiny_images(seed=1)})
    other = train_adapter({"__key__": ["k"] * 4, "meta": metas, "image": tiny_images(seed=7)})
    assert torch.equal(first["concept_ids"], again["concept_ids"])
    assert not torch.equal(first["concept_ids"], other["concept_ids"])


def test_two_image_samples_give_one_concept_row_per_image_and_missing_concepts_are_named():
    model, tokenizer = tiny_backbone(concept_layers=2)
    adapter = ConceptBatch(tokenizer, ConceptConfig(layers=2), train=False, images=2)
    assert adapter.texts(["pair"], [{"concepts": [["circle"], ["square", "red"]]}]) == ["circle", "square red"]
    with pytest.raises(ValueError, match="2 lists of words, one per image"):
        adapter.texts(["pair"], [{"concepts": ["circle"]}])
    with pytest.raises(ValueError, match=r"sample 'x' has no json.concepts.*python -m data_shards concepts"):
        ConceptBatch(tokenizer, ConceptConfig(layers=2), train=False).texts(["x"], [{}])
    assert concept_lists({"concepts": []}, "empty") == [[]]


def test_image_tokens_are_the_vit_over_patches_then_projected_concept_states():
    model, tokenizer = tiny_backbone(concept_layers=2)
    images, tokens = tiny_images(), tokenizer(CAPTIONS)
    concepts = tokenizer([" ".join(words) for words in CONCEPTS])
    concept_pair = (concepts["input_ids"], concepts["attention_mask"])
    encoded = model.encode(images, tokens["input_ids"], tokens["attention_mask"], Wants(image_layers=frozenset({1})),
                           concept_pair)
    states = model.concept_encoder.text.encode_text(*concept_pair)
    extra = model.concept_encoder.proj(states)
    assert torch.equal(encoded.concept_tokens, extra)
    encoder = model.visual_encoder
    hidden = torch.cat([encoder.embed(images), extra], dim=1)
    hidden = encoder.blocks[0](hidden)
    assert torch.allclose(encoded.image_layers[1], hidden, atol=1e-6)
    hidden = encoder.norm(encoder.blocks[1](hidden))
    assert encoded.image_tokens.shape == (4, 1 + 4 + concepts["input_ids"].shape[1], 64)
    assert torch.allclose(encoded.image_tokens, hidden, atol=1e-6)
    assert torch.allclose(model.image_embeddings(images, concept_pair)[0], hidden, atol=1e-6)
    with pytest.raises(ValueError, match="reads visual concepts .* but the batch carries none"):
        model.encode(images, tokens["input_ids"], tokens["attention_mask"])


def test_the_momentum_side_copies_the_concept_encoder_with_the_image_tower():
    model, tokenizer = tiny_backbone(concept_layers=2)
    assert momentum_towers(("visual_encoder", "text_encoder"), model) == ("visual_encoder", "text_encoder",
                                                                          "concept_encoder")
    assert momentum_towers(("text_encoder",), model) == ("text_encoder",)
    plain, _ = tiny_backbone()
    assert "concept_encoder" not in momentum_towers(("visual_encoder", "concept_encoder"), plain)
    copies = MomentumCopy({name: getattr(model, name) for name in momentum_towers(("visual_encoder",), model)})
    concepts = tokenizer([" ".join(words) for words in CONCEPTS])
    tokens = tokenizer(CAPTIONS)
    online = model.encode(tiny_images(), tokens["input_ids"], tokens["attention_mask"],
                          concepts=(concepts["input_ids"], concepts["attention_mask"]))
    momentum = encode(copies.towers(), tiny_images(), tokens["input_ids"], tokens["attention_mask"],
                      concepts=(concepts["input_ids"], concepts["attention_mask"]))
    assert torch.allclose(momentum.image_tokens, online.image_tokens, atol=1e-6)  # copies equal the online towers
    assert momentum.text_hidden is None
    assert "concept_encoder_m.proj.weight" in copies.state_dict()  # saved as concept_encoder_m.*, as ALBEF's towers
