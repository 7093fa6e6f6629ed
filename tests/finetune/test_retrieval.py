"""Retrieval fine-tuning: the entry point end to end (1 process and 2 deepspeed ranks), re-evaluation of the
kept checkpoint, the checkpoint-mismatch message, and the ITM re-ranking matrix against a direct computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from finetune import retrieval
from tests.finetune.conftest import read_results, run_finetune, write_finetune_config, write_micro_batch_config


def _data(world: dict) -> dict:
    return {"train": world["retrieval_train"], "val": world["retrieval_test"], "test": world["retrieval_test"]}


def test_rerank_keeps_top_k_itm_scores_and_minus_100_elsewhere():
    similarity = torch.tensor([[0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.7, 0.0]])
    itm = torch.tensor([[5.0, 6.0, 7.0, 8.0], [1.0, 2.0, 3.0, 4.0]])
    scores = retrieval._rerank(similarity, 2, lambda row, columns: itm[row, columns])
    expected = np.full((2, 4), -100.0)
    expected[0, [0, 2]] = [5.0, 7.0]
    expected[1, [1, 2]] = [2.0, 3.0]
    np.testing.assert_allclose(scores, expected)


def test_batch_adapter_picks_captions_and_requires_image_ids():
    class Tokenizer:
        def __call__(self, texts):
            return {"input_ids": torch.zeros(len(texts), 4, dtype=torch.long),
                    "attention_mask": torch.ones(len(texts), 4, dtype=torch.long)}

    batch = {"__key__": ["a", "b"], "text": ["A red Circle.", "x"],
             "meta": [{"image_id": 3}, {"image_id": 7, "captions": ["two squares", "one square"]}]}
    out = retrieval.RetrievalBatch(Tokenizer(), train=True)(batch)
    assert out["text"][0] == "a red circle"
    assert out["text"][1] in ("two squares", "one square")
    assert out["image_id"].tolist() == [3, 7]
    named = retrieval.RetrievalBatch(Tokenizer(), train=True)(
        {**batch, "meta": [{"image_id": "coco_328757"}, {"image_id": "coco_328757"}]})["image_id"].tolist()
    assert named[0] == named[1] and named[0] >= 1 << 40  # string ids (LAVIS files): one number per image
    assert retrieval.numeric_image_id("coco_1") != retrieval.numeric_image_id("coco_2")
    assert retrieval.numeric_image_id("42") == 42
    with pytest.raises(retrieval.DataError, match="'b' has no json.image_id"):
        retrieval.RetrievalBatch(Tokenizer(), train=True)({**batch, "meta": [{"image_id": 1}, {}]})


def test_finetune_then_evaluate_the_kept_checkpoint(tmp_path, finetune_world, tiny_checkpoint):
    config = write_finetune_config(tmp_path, "retrieval", _data(finetune_world), {"k_test": 4})
    ds_config = write_micro_batch_config(tmp_path)
    run_finetune("retrieval", config, tiny_checkpoint, ds_config)
    results = read_results(config)
    assert results["steps"] == 4  # 16 samples / micro-batch 4, one epoch
    test = results["test"]
    assert set(test) >= {"txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean", "chance_r1"}
    assert results["val"]["r_mean"] == pytest.approx(test["r_mean"])  # val and test are the same split here
    assert (tmp_path / "run" / "checkpoints" / "best" / "config.yaml").exists()

    again = write_finetune_config(tmp_path / "again", "retrieval", _data(finetune_world), {"k_test": 4})
    run_finetune("retrieval", again, str(tmp_path / "run" / "checkpoints"), ds_config, extra=["--evaluate"])
    assert read_results(again)["test"] == pytest.approx(test)


def test_two_deepspeed_ranks(tmp_path, finetune_world, tiny_checkpoint):
    config = write_finetune_config(tmp_path, "retrieval", _data(finetune_world), {"k_test": 4})
    run_finetune("retrieval", config, tiny_checkpoint, write_micro_batch_config(tmp_path, 2), ranks=2)
    results = read_results(config)
    assert results["world_size"] == 2 and results["steps"] == 4
    assert 0.0 <= results["test"]["r_mean"] <= 100.0


def test_checkpoint_that_does_not_fit_names_the_keys(tmp_path, finetune_world, tiny_checkpoint):
    config = write_finetune_config(tmp_path, "retrieval", _data(finetune_world), model={"embed_dim": 48})
    result = run_finetune("retrieval", config, tiny_checkpoint, write_micro_batch_config(tmp_path), check=False)
    assert result.returncode == 2
    assert "does not fit the configured model" in result.stderr
    assert "model.vision_proj.weight [32, 64] vs [48, 64]" in result.stderr


def test_chance_r_mean_matches_random_scores():
    rng = np.random.default_rng(0)
    img2txt = [[0, 1], [2], [3, 4, 5], [6]]
    txt2img = [0, 0, 1, 2, 2, 2, 3]
    from pretrain.retrieval_eval import retrieval_metrics

    trials = [retrieval_metrics(scores, scores.T, img2txt, txt2img)["r_mean"]
              for scores in rng.random((4000, 4, 7))]
    assert retrieval.chance_r_mean(img2txt, 7) == pytest.approx(np.mean(trials), abs=0.5)
