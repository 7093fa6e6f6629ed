"""Visual entailment fine-tuning: the batch adapter and its errors, the classifier on the fused [CLS] against a direct
computation, accuracy and chance, and the entry point end to end with re-evaluation of the kept checkpoint."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from finetune import ve
from pretrain.config import resolve_path
from pretrain.models.albef import build_albef
from tests.finetune.conftest import read_results, run_finetune, write_finetune_config, write_micro_batch_config
from tests.pretrain.conftest import TINY_MODEL


class Tokenizer:
    def __call__(self, texts):
        return {"input_ids": torch.arange(len(texts) * 4).view(len(texts), 4) % 50 + 1,
                "attention_mask": torch.ones(len(texts), 4, dtype=torch.long)}


def tiny_model():
    torch.manual_seed(0)
    return build_albef(TINY_MODEL["vision"], TINY_MODEL["image_size"], resolve_path(TINY_MODEL["bert_dir"]),
                       TINY_MODEL["fusion_layer"], embed_dim=TINY_MODEL["embed_dim"],
                       vision_overrides=TINY_MODEL["vision_overrides"], text_overrides=TINY_MODEL["text_overrides"])


def _batch(labels, images=None):
    size = len(labels)
    return {"__key__": [f"k{index}" for index in range(size)], "text": ["The Circle, left."] * size,
            "image": torch.zeros(size, 3, 32, 32) if images is None else images,
            "meta": [{"sentence": "The Circle, left.", "label": label} for label in labels]}


def test_adapter_maps_labels_to_albef_indices_and_cleans_sentences():
    out = ve.EntailmentBatch(Tokenizer(), max_words=30)(_batch(["entailment", "neutral", "contradiction"]))
    assert out["label"].tolist() == [2, 1, 0]
    assert out["text"] == ["the circle left"] * 3
    assert out["input_ids"].shape == (3, 4)


def test_adapter_names_the_bad_record():
    adapter = ve.EntailmentBatch(Tokenizer(), max_words=30)
    with pytest.raises(ve.DataError, match="sample 'k1': json.label 'maybe' is not one of"):
        adapter(_batch(["entailment", "maybe"]))
    batch = _batch(["neutral"])
    batch["meta"] = [{"label": "neutral", "sentence": " "}]
    with pytest.raises(ve.DataError, match="sample 'k0' has no sentence"):
        adapter(batch)
    with pytest.raises(ve.DataError, match="one image per sample"):
        adapter(_batch(["neutral"], images=torch.zeros(1, 2, 3, 32, 32)))


def test_classifier_reads_the_fused_cls_and_drops_unused_heads():
    task = ve.EntailmentTask(tiny_model()).eval()
    keys = set(task.state_dict())
    assert not any(key.startswith(("model.vision_proj", "model.text_proj", "model.itm_head", "model.text_encoder.cls"))
                   or key == "model.temp" for key in keys)
    assert {"cls_head.0.weight", "cls_head.2.weight"} <= keys
    assert task.cls_head[2].out_features == 3 and task.cls_head[0].out_features == task.cls_head[0].in_features
    torch.manual_seed(1)
    batch = {"image": torch.randn(2, 3, 32, 32), "input_ids": torch.randint(1, 100, (2, 5)),
             "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]), "label": torch.tensor([2, 0]),
             "__key__": ["a", "b"]}
    with torch.no_grad():
        model = task.model
        image = model.visual_encoder(batch["image"])
        fused = model.text_encoder(batch["input_ids"], batch["attention_mask"], image)[:, 0]
        expected = task.cls_head[2](torch.relu(task.cls_head[0](fused)))
        torch.testing.assert_close(task.logits(batch), expected)
        assert task(batch)["loss"].item() == pytest.approx(F.cross_entropy(expected, batch["label"]).item(), rel=1e-5)
        predictions = task.predict(batch)
    assert [record["prediction"] for record in predictions] == expected.argmax(1).tolist()
    assert [record["label"] for record in predictions] == [2, 0]


def test_accuracy_and_chance():
    records = [{"label": 0, "prediction": 0}, {"label": 0, "prediction": 1}, {"label": 0, "prediction": 0},
               {"label": 1, "prediction": 1}]
    metrics = ve.classification_metrics(records, ["a", "b", "c"])
    assert metrics["accuracy"] == 75.0
    assert metrics["accuracy_a"] == pytest.approx(200 / 3) and metrics["accuracy_b"] == 100.0
    assert "accuracy_c" not in metrics  # no sample of that class
    assert metrics["majority_class_rate"] == 75.0 and metrics["chance"] == 75.0  # the majority beats 33.3
    balanced = ve.classification_metrics([{"label": label, "prediction": 0} for label in (0, 1, 2)],
                                         ["a", "b", "c"])
    assert balanced["chance"] == pytest.approx(100 / 3) and balanced["accuracy"] == pytest.approx(100 / 3)
    with pytest.raises(ve.DataError):
        ve.classification_metrics([], ["a", "b"])


def test_finetune_then_evaluate_the_kept_checkpoint(tmp_path, finetune_world, tiny_checkpoint):
    data = {"train": finetune_world["ve_train"], "val": finetune_world["ve_test"], "test": finetune_world["ve_test"]}
    config = write_finetune_config(tmp_path, "ve", data)
    ds_config = write_micro_batch_config(tmp_path)
    run_finetune("ve", config, tiny_checkpoint, ds_config)
    results = read_results(config)
    assert results["steps"] == 4  # 16 samples / micro-batch 4, one epoch
    test = results["test"]
    assert 0.0 <= test["accuracy"] <= 100.0 and test["chance"] >= 100 / 3
    assert test["samples"] == 18  # 6 test images, one sentence per label each
    assert results["val"]["accuracy"] == pytest.approx(test["accuracy"])

    again = write_finetune_config(tmp_path / "again", "ve", data)
    run_finetune("ve", again, str(tmp_path / "run" / "checkpoints"), ds_config, extra=["--evaluate"])
    assert read_results(again)["test"] == pytest.approx(test)
