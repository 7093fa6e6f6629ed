"""VQA fine-tuning: the decoder key map, the causal answer decoder, the weighted answer loss and ALBEF's answer
ranking against direct computations, the batch adapter's errors, chance accuracy, the evaluation of splits with
and without answers, and the entry point end to end with both heads.

    nice .venv/bin/python -m pytest -q tests/finetune/test_vqa.py
"""

from __future__ import annotations

import json
from fnmatch import fnmatch
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from finetune import checkpoints, vqa
from finetune.loop import DataError
from finetune.metrics.vqa import vqa_accuracy
from pretrain.config import ConfigError, resolve_path
from pretrain.models.albef import build_albef, from_albef_state_dict, to_albef_state_dict
from pretrain.text.tokenizer import build_tokenizer
from tests.finetune.conftest import read_results, run_finetune, write_finetune_config, write_micro_batch_config
from tests.pretrain.conftest import TINY_MODEL

ANSWERS = ["yes", "no", "2", "red", "dark blue", "small"]


def _model(**text):
    overrides = {**TINY_MODEL["text_overrides"], **text}
    return build_albef(TINY_MODEL["vision"], TINY_MODEL["image_size"], resolve_path(TINY_MODEL["bert_dir"]),
                       TINY_MODEL["fusion_layer"], embed_dim=TINY_MODEL["embed_dim"],
                       vision_overrides=TINY_MODEL["vision_overrides"], text_overrides=overrides)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(resolve_path(TINY_MODEL["bert_dir"]), max_length=TINY_MODEL["max_text_length"])


@pytest.fixture
def answer_list(tmp_path):
    path = tmp_path / "answers.json"
    path.write_text(json.dumps(ANSWERS))
    return str(path)


def _vqa_options(answer_list, **options):
    return vqa.Options(answer_list=answer_list, results_dir="unused", **options)


def _task(tokenizer, answer_list, **options):
    torch.manual_seed(0)
    return vqa.build_task(_model(), tokenizer, _vqa_options(answer_list, **options)).eval()


def _meta(question_id, answers, dataset="vqa"):
    counts = {}
    for answer in answers:
        counts[answer] = counts.get(answer, 0) + 1
    return {"question_id": question_id, "dataset": dataset,
            "answers": [{"answer": answer, "count": count} for answer, count in counts.items()]}


def _batch(metas, questions=None):
    questions = questions or [f"What colour is shape {index}?" for index in range(len(metas))]
    return {"__key__": [f"k{index}" for index in range(len(metas))], "text": questions, "meta": metas,
            "image": torch.randn(len(metas), 3, TINY_MODEL["image_size"], TINY_MODEL["image_size"])}


def test_decoder_key_map_follows_albef():
    assert vqa.decoder_key("text_encoder.bert.encoder.layer.2.crossattention.self.key.weight", 2) == \
        "text_decoder.bert.encoder.layer.0.crossattention.self.key.weight"
    assert vqa.decoder_key("text_encoder.bert.encoder.layer.7.output.dense.bias", 6) == \
        "text_decoder.bert.encoder.layer.1.output.dense.bias"
    assert vqa.decoder_key("text_encoder.bert.encoder.layer.1.output.dense.bias", 2) is None
    assert vqa.decoder_key("text_encoder.bert.embeddings.word_embeddings.weight", 2) == \
        "text_decoder.bert.embeddings.word_embeddings.weight"
    assert vqa.decoder_key("text_encoder.cls.predictions.bias", 2) == "text_decoder.cls.predictions.bias"
    assert vqa.decoder_key("visual_encoder.pos_embed", 2) is None


def test_backbone_to_task_starts_the_decoder_from_the_fusion_layers(tokenizer, answer_list):
    torch.manual_seed(1)
    source = _model()
    state, _, _ = from_albef_state_dict(to_albef_state_dict(source.state_dict()))
    task = _task(tokenizer, answer_list)
    mapped = task.backbone_to_task(state)
    checkpoints.load_matching(task, mapped, new=vqa.SPEC.new_keys, unused=vqa.SPEC.unused_keys)
    fusion = source.text_encoder.fusion_layer
    for index, layer in enumerate(task.text_decoder.bert.encoder.layer):
        expected = source.text_encoder.bert.encoder.layer[fusion + index].state_dict()
        for name, value in layer.state_dict().items():
            torch.testing.assert_close(value, expected[name], msg=name)
    torch.testing.assert_close(task.text_decoder.cls.state_dict(), source.text_encoder.cls.state_dict())
    torch.testing.assert_close(task.text_decoder.bert.embeddings.state_dict(),
                               source.text_encoder.bert.embeddings.state_dict())
    assert task.model.text_encoder.cls is None


def test_a_released_vqa_file_keeps_its_own_decoder(tmp_path, tokenizer, answer_list):
    """ALBEF's vqa.pth layout: encoder without ``bert.`` and without the pretraining heads, its own
    ``text_decoder.*`` and momentum copies ``*_m``. The decoder loads from the file, not from the fusion layers."""
    torch.manual_seed(2)
    trained = _task(tokenizer, answer_list)
    for parameter in trained.text_decoder.parameters():
        parameter.data.normal_()
    released = {}
    for name, value in trained.state_dict().items():
        if name.startswith("model.text_encoder.bert."):
            name = "text_encoder." + name[len("model.text_encoder.bert."):]
        elif name.startswith("model."):
            name = name[len("model."):]
        released[name] = value.clone()
        head = name.split(".", 1)[0]
        released[name.replace(head, head + "_m", 1)] = value.clone()
    path = tmp_path / "vqa.pth"
    torch.save({"model": released}, path)

    state = checkpoints.backbone_state(checkpoints.open_checkpoint(str(path)), num_patches=None)
    task = _task(tokenizer, answer_list)
    checkpoints.load_matching(task, task.backbone_to_task(state), new=vqa.SPEC.new_keys,
                              unused=vqa.SPEC.unused_keys)
    torch.testing.assert_close(task.state_dict(), trained.state_dict())
    classifier = _task(tokenizer, answer_list, head="classifier")  # the file's decoder is not wanted there
    checkpoints.load_matching(classifier, classifier.backbone_to_task(state), new=vqa.SPEC.new_keys,
                              unused=vqa.SPEC.unused_keys)


def test_cross_attention_of_another_width_starts_fresh(tokenizer, answer_list):
    # Text width 96 != vision width 64: the encoder's cross-attention keys read 64-wide image tokens,
    # the decoder's read 96-wide question states.
    torch.manual_seed(1)
    source = _model(hidden_size=96)
    state, _, _ = from_albef_state_dict(to_albef_state_dict(source.state_dict()))
    task = vqa.build_task(_model(hidden_size=96), tokenizer, _vqa_options(answer_list))
    mapped = task.backbone_to_task(state)
    assert "text_decoder.bert.encoder.layer.0.crossattention.self.query.weight" in mapped
    for name in ("key.weight", "key.bias", "value.weight", "value.bias"):
        assert f"text_decoder.bert.encoder.layer.0.crossattention.self.{name}" not in mapped
    assert any(fnmatch("text_decoder.bert.encoder.layer.0.crossattention.self.key.weight", pattern)
               for pattern in vqa.SPEC.new_keys)


def test_answer_decoder_is_causal_and_its_nll_matches_a_direct_computation(tokenizer, answer_list):
    decoder = _task(tokenizer, answer_list).text_decoder
    states, question_mask = torch.randn(2, 5, 64), torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    ids = torch.tensor([[101, 2748, 2053, 102], [101, 1016, 102, 0]])
    mask = (ids != 0).long()
    hidden = decoder(ids, mask, states, question_mask)
    changed = ids.clone()
    changed[:, 2:] = 2417
    torch.testing.assert_close(decoder(changed, mask, states, question_mask)[:, :2], hidden[:, :2])
    assert not torch.allclose(decoder(changed, mask, states, question_mask)[:, 2:], hidden[:, 2:])
    log_probs = F.log_softmax(decoder.mlm_logits(hidden), dim=-1)
    expected = [-(log_probs[0, [0, 1, 2], [2748, 2053, 102]].sum()), -(log_probs[1, [0, 1], [1016, 102]].sum())]
    torch.testing.assert_close(decoder.answer_nll(ids, mask, states, question_mask), torch.stack(expected))


def test_decoder_loss_weights_each_answer_by_its_annotators(tokenizer, answer_list):
    task = _task(tokenizer, answer_list)
    options = _vqa_options(answer_list)
    metas = [_meta(1, ["yes"] * 7 + ["no"] * 3), _meta(2, ["2"], dataset="vg")]
    batch = vqa.VQABatch(tokenizer, options, train=True)(_batch(metas))
    assert batch["answer_counts"].tolist() == [2, 1]
    torch.testing.assert_close(batch["answer_weights"], torch.tensor([0.7, 0.3, 0.5]))
    states = task.question_states(batch)
    nll = [task.text_decoder.answer_nll(tokens["input_ids"], tokens["attention_mask"], states[row:row + 1],
                                        batch["attention_mask"][row:row + 1])
           for row, answer in ((0, "yes"), (0, "no"), (1, "2"))
           for tokens in [vqa.answer_tokenizer(tokenizer, options)([answer])]]
    expected = (0.7 * nll[0] + 0.3 * nll[1] + 0.5 * nll[2]) / 2
    torch.testing.assert_close(task(batch)["loss"], expected.squeeze())


@pytest.mark.parametrize("first_token_twice", [False, True])
def test_rank_answers_matches_brute_force_scoring(tokenizer, answer_list, first_token_twice):
    task = _task(tokenizer, answer_list, k=3, first_token_twice=first_token_twice)
    states, mask = torch.randn(4, 6, 64), torch.ones(4, 6, dtype=torch.long)
    decoder, count = task.text_decoder, len(ANSWERS)
    expected = []
    for row in range(4):
        nll = decoder.answer_nll(task.answer_ids, task.answer_mask, states[row].expand(count, -1, -1),
                                 mask[row].expand(count, -1))
        first = F.softmax(decoder.mlm_logits(decoder(task.answer_ids[:, :1], task.answer_mask[:, :1],
                                                     states[row].expand(count, -1, -1), mask[row].expand(count, -1))),
                          dim=-1)[0, 0, task.answer_ids[:, 1]]
        top = first.topk(3).indices
        score = -nll[top] + (first[top].log() if first_token_twice else 0)
        expected.append(top[score.argmax()].item())
    assert task.rank_answers(states, mask).tolist() == expected
    full = _task(tokenizer, answer_list, k=100, first_token_twice=False)
    best = [(-decoder.answer_nll(task.answer_ids, task.answer_mask, states[row].expand(count, -1, -1),
                                 mask[row].expand(count, -1))).argmax().item() for row in range(4)]
    assert full.rank_answers(states, mask).tolist() == best


def test_classifier_learns_soft_targets_over_the_list(tokenizer, answer_list):
    task = _task(tokenizer, answer_list, head="classifier")
    batch = vqa.VQABatch(tokenizer, task.options, train=True)(_batch([_meta(5, ["red"] * 6 + ["dark blue"] * 4)]))
    targets = torch.zeros(1, len(ANSWERS))
    targets[0, 3], targets[0, 4] = 0.6, 0.4
    torch.testing.assert_close(batch["answer_targets"], targets)
    logits = task.classifier(task.question_states(batch)[:, 0])
    torch.testing.assert_close(task(batch)["loss"], -(targets * F.log_softmax(logits, dim=1)).sum())
    prediction = task.predict(vqa.VQABatch(tokenizer, task.options, train=False)(_batch([_meta(5, ["red"])])))
    assert prediction == [{"question_id": 5, "answer": ANSWERS[logits.argmax().item()], "answers": ["red"]}]


def test_bad_training_records_name_the_question(tokenizer, answer_list):
    decoder = vqa.VQABatch(tokenizer, _vqa_options(answer_list), train=True)
    with pytest.raises(DataError, match="question_id 7 .* has no answer"):
        decoder(_batch([_meta(3, ["yes"]), _meta(7, [])]))
    with pytest.raises(DataError, match="sample 'k0' has no json.question_id"):
        decoder(_batch([{"answers": [{"answer": "yes", "count": 1}]}]))
    classifier = vqa.VQABatch(tokenizer, _vqa_options(answer_list, head="classifier"), train=True)
    with pytest.raises(DataError, match="question_id 9 .* the answer 'purple', which is not in options.answer_list"):
        classifier(_batch([_meta(9, ["red", "purple"])]))
    skipping = vqa.VQABatch(tokenizer, _vqa_options(answer_list, head="classifier",
                                                   skip_unknown_answers=True), train=True)
    assert skipping(_batch([_meta(9, ["red"] * 9 + ["purple"])]))["answer_targets"][0, 3] == pytest.approx(0.9)
    assert decoder(_batch([_meta(9, ["purple"])]))["answer_ids"].shape[0] == 1  # the decoder can learn any answer
    evaluation = vqa.VQABatch(tokenizer, _vqa_options(answer_list), train=False)
    assert "answer_ids" not in evaluation(_batch([_meta(4, [])]))  # test questions come without answers


def test_bad_options_and_answer_lists(tmp_path, answer_list):
    with pytest.raises(ConfigError, match="options.head='mlp'"):
        _vqa_options(answer_list, head="mlp")
    with pytest.raises(ConfigError, match="options.answer_list is not set"):
        vqa.Options()
    with pytest.raises(ConfigError, match="does not exist"):
        vqa.read_answer_list(str(tmp_path / "missing.json"))
    (tmp_path / "twice.json").write_text(json.dumps(["yes", "no", "yes"]))
    with pytest.raises(ConfigError, match="lists 'yes' more than once"):
        vqa.read_answer_list(str(tmp_path / "twice.json"))


def test_chance_is_the_mean_accuracy_of_a_uniform_answer():
    records = [{"question_id": 1, "answer": ["yes"] * 8 + ["no"] * 2},
               {"question_id": 2, "answer": ["2"] * 2 + ["two"] * 2 + ["3"] * 6},
               {"question_id": 3, "answer": ["Dark Blue"] * 10}]
    answers = ANSWERS + ["two", "3"]
    direct = sum(vqa_accuracy(answer, record["answer"]) for record in records for answer in answers)
    assert vqa.chance_accuracy(answers, records) == pytest.approx(100 * direct / (len(records) * len(answers)))


def _context(predictions, split, tmp_path):
    return SimpleNamespace(predictions=lambda: predictions, split=split, urls="shards.tar",
                           options=vqa.Options(answer_list="unused.json", results_dir=str(tmp_path)),
                           module=SimpleNamespace(answer_list=ANSWERS))


def test_evaluate_scores_answered_splits_and_writes_the_evalai_file(tmp_path):
    predictions = [{"question_id": 1, "answer": "yes", "answers": ["yes"] * 2 + ["no"] * 8},
                   {"question_id": 2, "answer": "red", "answers": ["red"] * 10}]
    metrics = vqa.evaluate(_context(predictions, "val", tmp_path))
    assert metrics["vqa_accuracy"] == pytest.approx(100 * (2 / 3 + 1) / 2)
    assert metrics["chance"] == pytest.approx(100 * (2 / 3 + 1 + 1) / (2 * len(ANSWERS)))  # yes, no; red
    assert json.loads((tmp_path / "vqa_val_results.json").read_text()) == [
        {"question_id": 1, "answer": "yes"}, {"question_id": 2, "answer": "red"}]

    unanswered = [{**prediction, "answers": []} for prediction in predictions]
    metrics = vqa.evaluate(_context(unanswered, "test", tmp_path))
    assert "vqa_accuracy" not in metrics and metrics["questions"] == 2
    assert len(json.loads((tmp_path / "vqa_test_results.json").read_text())) == 2
    with pytest.raises(DataError, match="val split 'shards.tar' has no answers"):
        vqa.evaluate(_context(unanswered, "val", tmp_path))
    with pytest.raises(DataError, match="question_id 2 has no answers while others have"):
        vqa.evaluate(_context([predictions[0], unanswered[1]], "test", tmp_path))


def _data(world: dict) -> dict:
    return {"train": world["vqa_train"], "val": world["vqa_test"], "test": world["vqa_test"]}


def _config_options(world: dict, tmp_path, **extra) -> dict:
    return {"answer_list": f"{world['annotations']}/vqa_answer_list.json", "k": 4,
            "results_dir": str(tmp_path / "results"), **extra}


def test_finetune_the_decoder_then_evaluate_the_kept_checkpoint(tmp_path, finetune_world, tiny_checkpoint):
    config = write_finetune_config(tmp_path, "vqa", _data(finetune_world), _config_options(finetune_world, tmp_path))
    ds_config = write_micro_batch_config(tmp_path)
    run_finetune("vqa", config, tiny_checkpoint, ds_config)
    results = read_results(config)
    assert results["steps"] == 4
    test = results["test"]
    assert 0.0 <= test["vqa_accuracy"] <= 100.0 and 0.0 < test["chance"] < 100.0
    written = json.loads((tmp_path / "results" / "vqa_test_results.json").read_text())
    assert len(written) == test["questions"] and {"question_id", "answer"} == set(written[0])

    (tmp_path / "again").mkdir()
    again = write_finetune_config(tmp_path / "again", "vqa", _data(finetune_world),
                                  _config_options(finetune_world, tmp_path / "again"))
    run_finetune("vqa", again, str(tmp_path / "run" / "checkpoints"), ds_config, extra=["--evaluate"])
    assert read_results(again)["test"]["vqa_accuracy"] == pytest.approx(test["vqa_accuracy"])


def test_classifier_head_on_two_deepspeed_ranks(tmp_path, finetune_world, tiny_checkpoint):
    options = _config_options(finetune_world, tmp_path, head="classifier")
    config = write_finetune_config(tmp_path, "vqa", _data(finetune_world), options)
    run_finetune("vqa", config, tiny_checkpoint, write_micro_batch_config(tmp_path, 2), ranks=2)
    results = read_results(config)
    assert results["world_size"] == 2 and results["steps"] == 4
    assert results["test"]["questions"] == len(json.loads(
        (tmp_path / "results" / "vqa_test_results.json").read_text()))
