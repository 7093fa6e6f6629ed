"""Captioning fine-tuning: beam search and sampling against brute force (a fixed number of decoder calls), the causal
decoder and its identity key map, the batch adapter, the LM and SCST losses against direct computations, the chance
caption, and the entry point end to end (LM then --evaluate, SCST on two ZeRO-3 ranks).

    nice .venv/bin/python -m pytest -q tests/finetune/test_captioning.py
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from finetune import captioning
from finetune.loop import DataError
from finetune.metrics.captioning import evaluate as caption_metrics
from pretrain.config import ConfigError, resolve_path
from pretrain.models.albef import build_albef, from_albef_state_dict, to_albef_state_dict
from pretrain.text.tokenizer import build_tokenizer
from tests.finetune.conftest import REPO, read_results, run_finetune, write_finetune_config, write_micro_batch_config
from tests.pretrain.conftest import TINY_MODEL

END, PAD = 1, 0


def _model():
    return build_albef(TINY_MODEL["vision"], TINY_MODEL["image_size"], resolve_path(TINY_MODEL["bert_dir"]),
                       TINY_MODEL["fusion_layer"], embed_dim=TINY_MODEL["embed_dim"],
                       vision_overrides=TINY_MODEL["vision_overrides"], text_overrides=TINY_MODEL["text_overrides"])


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(resolve_path(TINY_MODEL["bert_dir"]), max_length=TINY_MODEL["max_text_length"])


def _task(tokenizer, **options):
    torch.manual_seed(0)
    return captioning.CaptionTask(_model(), tokenizer, captioning.Options(**options)).eval()


class MarkovModel:
    """Next-token log-probs that depend on the last token only; counts its calls and checks the rows' history."""

    def __init__(self, vocab: int = 5, seed: int = 0):
        self.table = F.log_softmax(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed)) * 2, -1)
        self.calls = 0

    def __call__(self, tokens, origin):
        assert origin is None or (tokens.shape[1] == 1 and origin.shape[0] == tokens.shape[0])
        self.calls += 1
        return self.table[tokens[:, -1]]


def _brute_force_best(model: MarkovModel, first: int, steps: int, min_length: int, length_penalty: float) -> list[int]:
    best, best_score = None, float("-inf")
    for tokens in itertools.product(range(2, 5), repeat=steps):
        for end in range(min_length, steps + 1):  # the caption ends with END at position `end` or is cut at `steps`
            sequence = list(tokens[:end]) + ([END] if end < steps else [])
            score, last = 0.0, first
            for token in sequence:
                score += model.table[last, token].item()
                last = token
            score /= len(sequence) ** length_penalty
            if score > best_score:
                best, best_score = sequence + [PAD] * (steps - len(sequence)), score
    return best


@pytest.mark.parametrize(("seed", "length_penalty"), [(0, 1.0), (1, 1.0), (2, 1.0), (0, 0.0), (1, 0.5)])
def test_wide_beam_search_finds_the_best_length_normalised_caption_in_exactly_steps_calls(seed, length_penalty):
    model = MarkovModel(seed=seed)
    model.table[:, PAD] = float("-inf")  # the model never proposes padding itself
    prompt = torch.tensor([[3], [4]])
    generated = captioning.decode(model, prompt, steps=3, end_id=END, pad_id=PAD, beam_size=125, min_length=1,
                                  length_penalty=length_penalty)
    assert model.calls == 3
    assert generated.tolist() == [_brute_force_best(model, first, 3, 1, length_penalty) for first in (3, 4)]


def test_greedy_and_sampling_follow_the_model_and_pad_after_the_end():
    model = MarkovModel()
    model.table[:] = float("-inf")
    model.table[2, 3], model.table[3, END], model.table[END, 4] = 0.0, 0.0, 0.0
    model.table[3, 2] = -1.0
    prompt = torch.tensor([[2], [2]])
    assert captioning.decode(model, prompt, steps=4, end_id=END, pad_id=PAD).tolist() == [[3, END, PAD, PAD]] * 2
    assert captioning.decode(model, prompt, steps=4, end_id=END, pad_id=PAD, min_length=2).tolist() == \
        [[3, 2, 3, END]] * 2
    torch.manual_seed(0)
    sampled = captioning.decode(model, prompt.repeat(50, 1), steps=3, end_id=END, pad_id=PAD, sample=True)
    assert model.calls == 4 + 4 + 3
    assert {tuple(row) for row in sampled.tolist()} == {(3, END, PAD), (3, 2, 3)}


def test_decoder_is_causal_consistent_with_prefixes_and_keeps_the_albef_key_layout(tokenizer):
    torch.manual_seed(0)
    model = _model()
    albef_keys = set(from_albef_state_dict(to_albef_state_dict(model.state_dict()))[0])
    encoder = model.text_encoder
    task = captioning.CaptionTask(model, tokenizer, captioning.Options()).eval()
    assert set(task.state_dict()) == {f"model.{name}" for name in albef_keys
                                      if not name.startswith(("vision_proj", "text_proj", "itm_head", "temp"))}
    torch.testing.assert_close(task.decoder.state_dict(), encoder.state_dict())
    images = torch.randn(2, 5, 64)
    ids = torch.tensor([[101, 1037, 2417, 4418, 102], [101, 1037, 2630, 102, 0]])
    mask = (ids != 0).long()
    hidden = task.decoder(ids, mask, images)
    changed = ids.clone()
    changed[:, 3:] = 2307
    torch.testing.assert_close(task.decoder(changed, mask, images)[:, :3], hidden[:, :3])
    torch.testing.assert_close(task.decoder(ids[1:, :4], mask[1:, :4], images[1:])[0], hidden[1, :4])
    assert not torch.allclose(encoder(ids, mask, images)[:, :3], hidden[:, :3])  # the encoder attends both ways


def test_cached_generation_steps_match_the_full_decoder_after_beam_reordering(tokenizer):
    task = _task(tokenizer)
    images = task.image_tokens(torch.randn(2, 3, 32, 32))
    step = task._next_log_probs(images)
    prompt = torch.tensor([[101, 1037], [101, 1037]]).repeat_interleave(2, dim=0)  # two beams per image
    full = lambda ids: F.log_softmax(task.decoder.mlm_logits(  # noqa: E731
        task.decoder(ids, torch.ones_like(ids), images.repeat_interleave(2, dim=0))[:, -1]), dim=-1)
    torch.testing.assert_close(step(prompt, None), full(prompt))
    origin = torch.tensor([1, 1, 2, 3])  # image 0 keeps its second beam twice
    sequences = torch.cat([prompt[origin], torch.tensor([[2417], [2630], [4418], [102]])], dim=1)
    torch.testing.assert_close(step(sequences[:, -1:], origin), full(sequences), atol=1e-5, rtol=1e-4)
    origin = torch.tensor([0, 0, 3, 2])
    sequences = torch.cat([sequences[origin], torch.tensor([[4418], [2417], [0], [1037]])], dim=1)
    torch.testing.assert_close(step(sequences[:, -1:], origin), full(sequences), atol=1e-5, rtol=1e-4)


def test_adapter_appends_sep_masks_the_prompt_and_names_empty_records(tokenizer):
    options = captioning.Options(prompt="a picture of ")
    batch = {"__key__": ["a", "b"], "text": ["A red Circle.", "x"],
             "meta": [{"image_id": 3, "captions": ["A red Circle."]}, {"image_id": 7, "captions": ["two squares"]}],
             "image": torch.zeros(2, 3, 4, 4)}
    out = captioning.CaptionBatch(tokenizer, options, train=True)(batch)
    expected = tokenizer.tokenizer("a picture of a red circle", add_special_tokens=False)["input_ids"]
    assert out["input_ids"][0, :len(expected) + 2].tolist() == [tokenizer.cls_token_id, *expected,
                                                                 tokenizer.sep_token_id]
    assert out["targets"][0, :4].tolist() == [-100] * 4  # [CLS] a picture of
    assert out["targets"][0, 4:len(expected) + 2].tolist() == [*expected[3:], tokenizer.sep_token_id]
    padding = out["attention_mask"][1] == 0
    assert padding.any() and (out["targets"][1][padding] == -100).all()
    assert out["image_id"] == [3, 7] and out["references"] == [["A red Circle."], ["two squares"]]
    evaluation = captioning.CaptionBatch(tokenizer, options, train=False)(batch)
    assert "input_ids" not in evaluation and evaluation["references"] == out["references"]
    with pytest.raises(DataError, match="'b' has no caption"):
        captioning.CaptionBatch(tokenizer, options, train=True)({**batch, "text": ["x", " "],
                                                                 "meta": [{"captions": ["x"]}, {}]})


def test_lm_loss_is_the_next_token_cross_entropy_on_caption_tokens(tokenizer):
    task = _task(tokenizer, prompt="a picture of ", label_smoothing=0.1)
    batch = captioning.CaptionBatch(tokenizer, task.options, train=True)(
        {"__key__": ["a", "b"], "text": ["", ""], "meta": [{"captions": ["a red circle"]}, {"captions": ["one"]}],
         "image": torch.randn(2, 3, 32, 32)})
    loss = task(batch)["loss"]
    logits = task.decoder.mlm_logits(task.decoder(batch["input_ids"], batch["attention_mask"],
                                                  task.image_tokens(batch["image"])))
    expected = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["targets"][:, 1:], label_smoothing=0.1)
    torch.testing.assert_close(loss, expected)


def test_predict_returns_one_caption_per_image_and_scst_weighs_samples_by_their_advantage(tokenizer):
    task = _task(tokenizer, max_length=6, min_length=1, beam_size=2, scst=True, scst_samples=3)
    images = torch.randn(2, 3, 32, 32)
    batch = {"image": images, "image_id": [5, 6], "references": [["a red circle"], ["two blue squares"]]}
    predictions = task.predict(batch)
    assert [prediction["image_id"] for prediction in predictions] == [5, 6]
    assert all(isinstance(prediction["caption"], str) for prediction in predictions)
    task.train()
    torch.manual_seed(3)
    losses = task(batch)
    assert set(losses) == {"loss", "scst", "reward", "greedy_reward"}
    assert losses["loss"].requires_grad and torch.isfinite(losses["loss"])
    losses["loss"].backward()
    assert task.decoder.bert.encoder.layer[-1].crossattention.self.key.weight.grad is not None


def test_most_frequent_caption_and_chance_score():
    captions = ["A red circle.", "a blue square", "a red circle", "a blue square", "a red circle", "one triangle"]
    assert captioning.most_frequent_caption(captions) == "a red circle"
    assert captioning.most_frequent_caption(["one triangle", "a blue square"]) == "a blue square"  # a tie
    with pytest.raises(DataError, match="no caption"):
        captioning.most_frequent_caption([])


def test_evaluate_groups_references_by_image_and_falls_back_to_the_split_for_chance():
    rows = [{"image_id": 1, "caption": "a red circle", "references": ["a red circle"]},
            {"image_id": 1, "caption": "a red circle", "references": ["one red circle"]},
            {"image_id": 2, "caption": "a blue square", "references": ["a blue square", "a red circle"]}]
    context = SimpleNamespace(predictions=lambda: rows, options=captioning.Options(), split="test", urls="x",
                              module=SimpleNamespace(chance_captions={}))
    metrics = captioning.evaluate(context)
    references = {1: ["a red circle", "one red circle"], 2: ["a blue square", "a red circle"]}
    expected = caption_metrics({1: "a red circle", 2: "a blue square"}, references)
    assert metrics["cider"] == pytest.approx(expected["cider"])
    assert metrics["bleu_4"] == pytest.approx(expected["bleu_4"])
    chance = caption_metrics({1: "a red circle", 2: "a red circle"}, references)  # the split's commonest reference
    assert metrics["chance"] == pytest.approx(chance["cider"])


def test_options_are_checked():
    with pytest.raises(ConfigError, match="min_length"):
        captioning.Options(min_length=20, max_length=20)
    with pytest.raises(ConfigError, match="label_smoothing"):
        captioning.Options(label_smoothing=1.0)


def _data(world: dict) -> dict:
    return {"train": world["caption_train"], "val": world["caption_test"], "test": world["caption_test"]}


def _options(world: dict, **extra) -> dict:
    return {"beam_size": 2, "max_length": 6, "min_length": 1, "train_captions": world["caption_train"], **extra}


def test_finetune_then_evaluate_the_kept_checkpoint(tmp_path, finetune_world, tiny_checkpoint):
    config = write_finetune_config(tmp_path, "captioning", _data(finetune_world), _options(finetune_world))
    ds_config = write_micro_batch_config(tmp_path)
    run_finetune("captioning", config, tiny_checkpoint, ds_config)
    results = read_results(config)
    assert results["steps"] == 4
    test = results["test"]
    assert set(test) == {"bleu_1", "bleu_2", "bleu_3", "bleu_4", "cider", "chance", "chance_bleu_4"}
    annotations = Path(finetune_world["annotations"])
    records = json.loads((annotations / "caption_test.json").read_text())
    train = json.loads((annotations / "caption_train.json").read_text())
    chance_caption = captioning.most_frequent_caption(record["caption"] for record in train)
    references = {record["image_id"]: record["caption"] for record in records}
    expected = caption_metrics({image_id: chance_caption for image_id in references}, references)
    assert test["chance"] == pytest.approx(expected["cider"])

    again = write_finetune_config(tmp_path / "again", "captioning", _data(finetune_world), _options(finetune_world))
    run_finetune("captioning", again, str(tmp_path / "run" / "checkpoints"), ds_config, extra=["--evaluate"])
    assert read_results(again)["test"] == pytest.approx(test)


def test_scst_on_two_zero3_ranks_with_every_parameter_partitioned(tmp_path, finetune_world, tiny_checkpoint):
    ds = json.loads((REPO / "ds_configs" / "zero3_bf16.json").read_text())
    ds.update(train_micro_batch_size_per_gpu=2, bf16={"enabled": False})
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    ds_config = tmp_path / "zero3.json"
    ds_config.write_text(json.dumps(ds))
    config = write_finetune_config(tmp_path, "captioning", {**_data(finetune_world), "train_samples": 8},
                                   _options(finetune_world, scst=True, scst_samples=2))
    run_finetune("captioning", config, tiny_checkpoint, ds_config, ranks=2, extra=["--max-steps", "2"])
    results = read_results(config)
    assert results["world_size"] == 2 and results["steps"] == 2
    assert set(results["final_loss"]) == {"loss", "scst", "reward", "greedy_reward"}
    assert results["test"]["cider"] >= 0.0
