"""NLVR2 fine-tuning: the doubled fusion layers and their key map against the pretrained layers applied directly,
the text-assignment examples, the batch adapters and their errors, and the entry point end to end (with the
text-assignment phase, then re-evaluation of the kept checkpoint)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from finetune import checkpoints, nlvr2
from tests.finetune.conftest import read_results, run_finetune, write_finetune_config, write_micro_batch_config
from tests.finetune.test_ve import Tokenizer, tiny_model

FUSION = 2  # TINY_MODEL: 3 text layers, fusion from layer 2


def test_key_map_duplicates_each_fusion_layer_into_two_blocks():
    prefix = nlvr2.LAYER_PREFIX
    state = {f"{prefix}1.attention.self.query.weight": 1, f"{prefix}2.crossattention.self.key.weight": 2,
             f"{prefix}3.output.dense.bias": 3, "visual_encoder.cls_token": 4}
    assert nlvr2.duplicate_fusion_layers(state, fusion_layer=2) == {
        f"{prefix}1.attention.self.query.weight": 1,
        f"{prefix}2.crossattention.self.key.weight": 2, f"{prefix}3.crossattention.self.key.weight": 2,
        f"{prefix}4.output.dense.bias": 3, f"{prefix}5.output.dense.bias": 3, "visual_encoder.cls_token": 4}


def _pair_task(text_assignment: bool = False):
    """A PairTask loaded from a tiny pretrained-layout state, and the untouched model that state came from."""
    pretrained = tiny_model()
    state = {name: tensor for name, tensor in pretrained.state_dict().items()}
    task = nlvr2.PairTask(copy.deepcopy(pretrained), nlvr2.Options(text_assignment=text_assignment))
    mapped = {key: value for key, value in task.backbone_to_task(state).items() if key in task.state_dict()}
    missing = set(task.state_dict()) - set(mapped)
    assert all(key.startswith(("cls_head.", "ta_head.")) for key in missing), missing
    task.load_state_dict(mapped, strict=False)
    return task.eval(), pretrained.eval()


def test_doubled_encoder_blocks_read_one_image_each_and_share_key_value():
    task, _ = _pair_task()
    layers = task.model.text_encoder.bert.encoder.layer
    assert len(layers) == FUSION + 2 * 1
    assert [layer.image_index for layer in layers[FUSION:]] == [0, 1]
    first, second = layers[FUSION].crossattention.self, layers[FUSION + 1].crossattention.self
    assert first.key is second.key and first.value is second.value
    assert first.query is not second.query
    assert task.model.text_encoder.config.num_hidden_layers == 4


def test_pair_logits_equal_each_pretrained_fusion_layer_applied_to_image_0_then_image_1():
    task, pretrained = _pair_task()
    torch.manual_seed(2)
    batch = {"image": torch.randn(3, 2, 3, 32, 32), "input_ids": torch.randint(1, 100, (3, 6)),
             "attention_mask": torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 5 + [0]]),
             "label": torch.tensor([1, 0, 1]), "__key__": ["a", "b", "c"]}
    with torch.no_grad():
        image0 = pretrained.visual_encoder(batch["image"][:, 0])
        image1 = pretrained.visual_encoder(batch["image"][:, 1])
        text = pretrained.text_encoder
        hidden = text.encode_text(batch["input_ids"], batch["attention_mask"])
        for layer in text.bert.encoder.layer[FUSION:]:
            hidden = text._run_layers([layer], hidden, batch["attention_mask"], image0)
            hidden = text._run_layers([layer], hidden, batch["attention_mask"], image1)
        expected = task.cls_head(hidden[:, 0])
        torch.testing.assert_close(task.logits(batch), expected, rtol=1e-4, atol=1e-5)
        assert task(batch)["loss"].item() == pytest.approx(F.cross_entropy(expected, batch["label"]).item(), rel=1e-4)
        assert [record["prediction"] for record in task.predict(batch)] == expected.argmax(1).tolist()


def test_assignment_examples_follow_albef_sampling():
    features = F.normalize(torch.tensor([[1.0, 0, 0], [1.0, 0.01, 0], [0, 1.0, 0], [0, 0, 1.0], [0, 1.0, 0.01]]),
                           dim=1)
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(3)
    for _ in range(300):
        first, second, labels = nlvr2.assignment_examples(features, generator)
        counts += torch.bincount(labels, minlength=3)
        own = torch.arange(5)
        assert torch.equal(first[labels == 0], own[labels == 0]) and torch.equal(second[labels == 1], own[labels == 1])
        assert not ((first == own) | (second == own))[labels == 2].any()
        assert not (first == second)[labels == 2].any()
        # a near-duplicate is almost surely the partner of image 0 (similarity / 0.07)
        partner = torch.where(labels == 0, second, first)
        assert partner[0] == 1 or labels[0] == 2
    assert counts.tolist() == pytest.approx([500, 500, 500], abs=80)
    _, _, labels = nlvr2.assignment_examples(features[:2], generator)
    assert set(labels.tolist()) <= {0, 1}
    with pytest.raises(ValueError, match="at least 2 images"):
        nlvr2.assignment_examples(features[:1])


def test_text_assignment_head_scores_the_drawn_pairs():
    task, _ = _pair_task(text_assignment=True)
    assert not task.model.vision_proj.weight.requires_grad and task.ta_head.out_features == 3
    batch = {"image": torch.randn(4, 3, 32, 32), "input_ids": torch.randint(1, 100, (4, 5)),
             "attention_mask": torch.ones(4, 5, dtype=torch.long), "__key__": list("abcd")}
    with torch.no_grad():
        first = task.predict(batch)
        assert task.predict(batch) == first  # evaluation draws are seeded by the keys
        calls = []
        hook = task.model.visual_encoder.register_forward_hook(lambda *_: calls.append(1))
        single = {name: value[:1] for name, value in batch.items()}
        assert task.predict(single) == [{"key": "a", "label": None, "prediction": None}]
        hook.remove()
        assert calls == [1]  # not scored, but forwarded like every other rank's batch (ZeRO-3 collectives)
        assert task(batch)["loss"].item() > 0
    with pytest.raises(ValueError, match="options.text_assignment"):
        _pair_task()[0](batch)


def test_adapters_name_the_bad_record():
    pairs = {"__key__": ["p0", "p1"], "text": ["x", "y"], "image": torch.zeros(2, 2, 3, 8, 8),
             "meta": [{"sentence": "The left image, has 2 circles.", "label": True}, {"sentence": "y", "label": False}]}
    out = nlvr2.PairBatch(Tokenizer(), 30)(pairs)
    assert out["label"].tolist() == [1, 0] and out["text"][0] == "the left image has 2 circles"
    with pytest.raises(nlvr2.DataError, match="sample 'p1': json.label 'False' is not true/false"):
        nlvr2.PairBatch(Tokenizer(), 30)({**pairs, "meta": [pairs["meta"][0], {"sentence": "y", "label": "False"}]})
    with pytest.raises(nlvr2.DataError, match="two images per sample"):
        nlvr2.PairBatch(Tokenizer(), 30)({**pairs, "image": torch.zeros(2, 3, 8, 8)})
    captions = {"__key__": ["c0"], "text": ["A red circle."], "image": torch.zeros(1, 3, 8, 8),
                "meta": [{"captions": ["A red circle.", "one circle"]}]}
    assert nlvr2.CaptionBatch(Tokenizer(), 30, train=False)(captions)["text"] == ["a red circle"]
    with pytest.raises(nlvr2.DataError, match="'c0' has no caption"):
        nlvr2.CaptionBatch(Tokenizer(), 30, train=True)({**captions, "text": [""], "meta": [{}]})


def test_text_assignment_needs_its_shards(tmp_path, finetune_world):
    data = {"train": finetune_world["nlvr2_train"], "test": finetune_world["nlvr2_test"]}
    config = write_finetune_config(tmp_path, "nlvr2", data, {"text_assignment": True})
    assert nlvr2.main(["--config", str(config), "--checkpoint", "unused"]) == 2


def test_text_assignment_then_finetune_then_evaluate(tmp_path, finetune_world, tiny_checkpoint):
    data = {"train": finetune_world["nlvr2_train"], "val": finetune_world["nlvr2_test"],
            "test": finetune_world["nlvr2_test"]}
    options = {"text_assignment": True, "text_assignment_train": finetune_world["retrieval_train"],
               "text_assignment_val": finetune_world["retrieval_test"], "text_assignment_steps": 2}
    config = write_finetune_config(tmp_path, "nlvr2", data, options)
    ds_config = write_micro_batch_config(tmp_path)
    run_finetune("nlvr2", config, tiny_checkpoint, ds_config)
    results = read_results(config)
    assert results["steps"] == 4  # 16 samples / micro-batch 4, one epoch
    test = results["test"]
    assert 0.0 <= test["accuracy"] <= 100.0 and test["chance"] >= 50.0 and test["samples"] == 6
    phase = results["text_assignment"]
    assert phase["checkpoint"] == tiny_checkpoint and phase["steps"] == 2
    assert results["checkpoint"].startswith(str(tmp_path / "run" / "text_assignment" / "checkpoints"))
    phase_results = json.loads((tmp_path / "run" / "text_assignment" / "results.json").read_text())
    assert phase_results["val"]["samples"] == 6 and phase_results["val"]["chance"] >= 100 / 3

    again = write_finetune_config(tmp_path / "again", "nlvr2", data, options)
    run_finetune("nlvr2", again, str(tmp_path / "run" / "checkpoints"), ds_config, extra=["--evaluate"])
    assert read_results(again)["test"] == pytest.approx(test)


def test_a_released_text_assignment_file_loads_without_doubling_again(tmp_path):
    """ALBEF's pretrain_model_nlvr.pth layout: the doubled encoder stored as ``text_encoder.encoder.layer.N``
    (no ``bert.``), a ``ta_head``, no momentum copies. It must load as it is, not be doubled a second time."""
    pretrained = tiny_model()
    doubled = nlvr2.duplicate_fusion_layers(pretrained.state_dict(), FUSION)
    released = {key.replace("text_encoder.bert.", "text_encoder."): value for key, value in doubled.items()
                if not key.startswith("text_encoder.cls.")}
    hidden = pretrained.text_encoder.hidden_size
    released["ta_head.weight"], released["ta_head.bias"] = torch.randn(3, hidden), torch.randn(3)
    path = tmp_path / "pretrain_model_nlvr.pth"
    torch.save({"model": released}, path)

    state = checkpoints.backbone_state(checkpoints.open_checkpoint(str(path)), num_patches=None)
    for text_assignment in (True, False):
        task = nlvr2.PairTask(tiny_model(), nlvr2.Options(text_assignment=text_assignment))
        checkpoints.load_matching(task, task.backbone_to_task(state), new=nlvr2.SPEC.new_keys,
                                  unused=nlvr2.SPEC.unused_keys)
        loaded = task.state_dict()
        for key, value in doubled.items():
            if f"model.{key}" in loaded:
                assert torch.equal(loaded[f"model.{key}"], value), key
        if text_assignment:
            assert torch.equal(task.ta_head.weight, released["ta_head.weight"])
