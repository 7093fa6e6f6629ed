"""Grounding fine-tuning: both modes' entry points end to end, ``visualize``, and Grad-CAM, the explicit
cross-attention, the box losses, the adapter and the chance values against direct computations.

    .venv/bin/python -m pytest -q tests/finetune/test_grounding.py
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torchvision.ops import box_convert, box_iou

from finetune import grounding
from pretrain.config import ConfigError, resolve_path
from pretrain.models.albef import build_albef
from tests.finetune.conftest import REPO, read_results, run_finetune, write_finetune_config, write_micro_batch_config
from tests.pretrain.conftest import TINY_MODEL


class Tokenizer:
    def __call__(self, texts):
        lengths = [len(text.split()) + 1 for text in texts]
        mask = torch.tensor([[int(i < n) for i in range(max(lengths))] for n in lengths])
        return {"input_ids": mask.clone(), "attention_mask": mask}


def _tiny_model():
    torch.manual_seed(0)
    return build_albef(TINY_MODEL["vision"], TINY_MODEL["image_size"], resolve_path(TINY_MODEL["bert_dir"]),
                       TINY_MODEL["fusion_layer"], embed_dim=TINY_MODEL["embed_dim"],
                       vision_overrides=TINY_MODEL["vision_overrides"], text_overrides=TINY_MODEL["text_overrides"])


def test_gradcam_from_attention_matches_a_direct_loop():
    generator = torch.Generator().manual_seed(0)
    batch, heads, tokens, side = 2, 3, 4, 2
    probabilities = torch.rand(batch, heads, tokens, 1 + side * side, generator=generator)
    gradients = torch.randn(batch, heads, tokens, 1 + side * side, generator=generator)
    text_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    expected = torch.zeros(batch, side * side)
    for b in range(batch):
        for patch in range(side * side):
            total = sum(probabilities[b, h, t, 1 + patch] * max(gradients[b, h, t, 1 + patch], 0) * text_mask[b, t]
                        for h in range(heads) for t in range(tokens))
            expected[b, patch] = total / (heads * tokens)  # padded positions count as zeros in the mean
    result = grounding.gradcam_from_attention(probabilities, gradients, text_mask, (side, side))
    torch.testing.assert_close(result, expected.reshape(batch, side, side))


def test_explicit_cross_attention_matches_sdpa_and_exposes_probabilities():
    model = _tiny_model().eval()
    images = torch.randn(2, 3, 32, 32)
    input_ids = torch.tensor([[101, 7, 8, 9], [101, 5, 0, 0]])
    attention_mask = (input_ids > 0).long()
    with torch.no_grad():
        image_tokens, _ = model.image_embeddings(images)
        text_hidden = model.text_encoder.encode_text(input_ids, attention_mask)
        reference = model.text_encoder.fuse(text_hidden, attention_mask, image_tokens)
        layer = model.text_encoder.bert.encoder.layer[2]
        with grounding.CrossAttentionRecorder(layer) as recorder:
            explicit = model.text_encoder.fuse(text_hidden, attention_mask, image_tokens)
    torch.testing.assert_close(explicit, reference, rtol=1e-5, atol=1e-5)
    probabilities = recorder.probabilities
    assert probabilities.shape == (2, 2, 4, 5)  # batch, heads, text tokens, image [CLS] + 2x2 patches
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(2, 2, 4))
    assert not layer.crossattention.self._forward_hooks  # the hook is gone after the block


def test_gradcam_counts_padding_as_zeros_in_the_token_mean():
    model = _tiny_model().eval()
    images = torch.randn(1, 3, 32, 32).repeat(2, 1, 1, 1)
    alone = grounding.gradcam_maps(model, images[:1], torch.tensor([[101, 7]]), torch.tensor([[1, 1]]), 2)
    padded = grounding.gradcam_maps(model, images, torch.tensor([[101, 7, 0, 0], [101, 7, 8, 9]]),
                                    torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]), 2)
    assert alone.shape == (1, 2, 2) and (alone >= 0).all()
    torch.testing.assert_close(padded[0] * 4, alone[0] * 2, rtol=1e-4, atol=1e-7)


def test_box_task_predicts_pixel_boxes_from_sigmoid_cxcywh():
    task = grounding.BoxGroundingTask(_tiny_model().eval(), grounding.Options(mode="box"))
    batch = {"__key__": ["a", "b"], "image": torch.randn(2, 3, 32, 32), "input_ids": torch.tensor([[101, 7]] * 2),
             "attention_mask": torch.ones(2, 2, dtype=torch.long), "box": torch.tensor([[1.0, 2, 9, 12]] * 2),
             "proposals": [torch.tensor([[1.0, 2, 9, 12], [20, 20, 30, 30]]), None]}
    with torch.no_grad():
        normalised = task.predict_normalised(batch["image"], batch["input_ids"], batch["attention_mask"])
        predictions = task.predict(batch)
    centre, size = normalised[0, :2] * 32, normalised[0, 2:] * 32
    torch.testing.assert_close(torch.tensor(predictions[0]["predicted"]), torch.cat([centre - size / 2,
                                                                                     centre + size / 2]))
    assert predictions[0]["random_proposal_hits"] == 0.5 and predictions[1]["random_proposal_hits"] is None
    losses = task(batch)
    assert losses["loss"].item() == pytest.approx(losses["l1"].item() + losses["giou"].item())


def test_adapter_boxes_proposals_ids_and_errors():
    metas = [{"box": [1, 2, 3, 4], "proposals": [[1, 2, 3, 4], [0, 0, 5, 5]], "image_id": 7},
             {"box": [0, 0, 2, 2], "proposals": [[0, 0, 2, 2]]}]
    batch = {"__key__": ["a", "b"], "text": ["The Red circle.", "a square"], "meta": metas,
             "image": torch.zeros(2, 3, 8, 8)}
    out = grounding.GroundingBatch(Tokenizer(), "gradcam", train=False)(batch)
    assert out["text"] == ["the red circle", "a square"]
    assert out["box"].tolist() == [[1, 2, 3, 4], [0, 0, 2, 2]]
    assert out["proposals"][0].shape == (2, 4)
    assert out["image_id"][0] >= 0 and out["image_id"][1] < 0  # no image_id: an id of its own
    assert "box" not in grounding.GroundingBatch(Tokenizer(), "gradcam", train=True)(batch)
    same_image = [{**metas[0], "proposals": [{"box": [1, 2, 3, 4]}]}, {**metas[1], "image_id": 7}]
    out = grounding.GroundingBatch(Tokenizer(), "gradcam", train=False)({**batch, "meta": same_image})
    assert out["image_id"][0] == out["image_id"][1] and out["proposals"][0].tolist() == [[1, 2, 3, 4]]
    with pytest.raises(grounding.DataError, match="'b' has no json.proposals"):
        grounding.GroundingBatch(Tokenizer(), "gradcam", False)({**batch, "meta": [metas[0], {"box": [0, 0, 1, 1]}]})
    with pytest.raises(grounding.DataError, match="'a' has no json.box"):
        grounding.GroundingBatch(Tokenizer(), "box", True)({**batch, "meta": [{}, metas[1]]})
    with pytest.raises(grounding.DataError, match="'b' has an empty expression"):
        grounding.GroundingBatch(Tokenizer(), "box", True)({**batch, "text": ["x", "?!"]})


def test_evaluate_accuracy_and_chances():
    gradcam = [{"predicted": [0, 0, 10, 10], "box": [0, 0, 10, 10], "random_proposal_hits": 0.25},
               {"predicted": [0, 0, 10, 10], "box": [20, 20, 30, 30], "random_proposal_hits": 0.5}]
    context = SimpleNamespace(predictions=lambda: gradcam, options=grounding.Options(mode="gradcam"))
    assert grounding.evaluate(context) == {"accuracy": 50.0, "samples": 2, "chance_random_proposal": 37.5,
                                           "chance": 37.5}
    boxes = torch.tensor([[10.0, 10, 20, 20]] * 3 + [[0, 10, 8, 20]])
    box = [{"predicted": [0, 0, 1, 1], "box": target.tolist(), "image_size": [32, 64], "random_proposal_hits": None}
           for target in boxes]
    metrics = grounding.evaluate(SimpleNamespace(predictions=lambda: box, options=grounding.Options(mode="box")))
    scale = torch.tensor([32.0, 64, 32, 64])
    normalised = box_convert(boxes, "xyxy", "cxcywh") / scale
    mean_box = box_convert(normalised.mean(0, keepdim=True), "cxcywh", "xyxy") * scale
    expected = 100 * (box_iou(mean_box, boxes)[0] >= 0.5).double().mean().item()
    assert metrics["accuracy"] == 0.0 and "chance_random_proposal" not in metrics
    assert metrics["chance"] == pytest.approx(expected) == 75.0


def test_options_and_gradcam_layer_are_checked():
    with pytest.raises(ConfigError, match="options.mode='boxes'"):
        grounding.Options(mode="boxes")
    with pytest.raises(ConfigError, match="fusion layers of this text encoder are 2..2"):
        grounding.GradcamGroundingTask(_tiny_model(), grounding.Options(gradcam_layer=1))
    assert grounding.GradcamGroundingTask(_tiny_model(), grounding.Options()).layer_index == 2


def _data(world: dict) -> dict:
    return {"train": world["refcoco_train"], "val": world["refcoco_test"], "test": world["refcoco_test"]}


def test_gradcam_finetune_then_evaluate_the_kept_checkpoint(tmp_path, finetune_world, tiny_checkpoint):
    config = write_finetune_config(tmp_path, "grounding", _data(finetune_world), {"mode": "gradcam"})
    ds_config = write_micro_batch_config(tmp_path)
    run_finetune("grounding", config, tiny_checkpoint, ds_config)
    results = read_results(config)
    test = results["test"]
    assert results["steps"] == 4 and 0.0 <= test["accuracy"] <= 100.0 and 0.0 < test["chance"] < 100.0
    assert test["chance"] == test["chance_random_proposal"]
    again = write_finetune_config(tmp_path / "again", "grounding", _data(finetune_world), {"mode": "gradcam"})
    run_finetune("grounding", again, str(tmp_path / "run" / "checkpoints"), ds_config, extra=["--evaluate"])
    assert read_results(again)["test"] == pytest.approx(test)


def test_box_finetune_and_visualize(tmp_path, finetune_world, tiny_checkpoint):
    config = write_finetune_config(tmp_path, "grounding", _data(finetune_world), {"mode": "box"})
    run_finetune("grounding", config, tiny_checkpoint, write_micro_batch_config(tmp_path))
    results = read_results(config)
    assert results["steps"] == 4 and math.isfinite(results["final_loss"]["giou"])
    assert {"accuracy", "chance", "chance_random_proposal"} <= set(results["test"])

    image = sorted((Path(finetune_world["annotations"]).parent / "images").glob("*.jpg"))[0]
    out = tmp_path / "heat" / "heat.png"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

    def visualize(image_path):
        command = [sys.executable, "-m", "finetune.grounding", "visualize", "--config", str(config), "--checkpoint",
                   str(tmp_path / "run" / "checkpoints"), "--image", str(image_path), "--text", "the red circle",
                   "--out", str(out)]
        return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)

    result = visualize(image)
    assert result.returncode == 0, result.stderr[-3000:]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    missing = visualize(tmp_path / "nope.jpg")
    assert missing.returncode == 2 and "nope.jpg' does not exist" in missing.stderr
