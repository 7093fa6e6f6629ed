"""VQA metric: the official normalisation on known strings, min(matches/3, 1) and its leave-one-out variant
against a brute-force count over annotator subsets, record errors, and the EvalAI file round trip."""

from __future__ import annotations

import itertools
import json
import random

import numpy as np
import pytest

from finetune.metrics.vqa import CONTRACTIONS, evaluate, normalize_answer, vqa_accuracy, write_evalai_results


@pytest.mark.parametrize(("raw", "normalized"), [
    ("Two dogs.", "2 dogs"),
    ("The Red-Blue car", "red blue car"),        # "-" touches no space: replaced by a space
    ("red - blue", "red blue"),                  # " -" occurs: removed
    ("1,000", "1000"),                           # a digit-comma-digit group: marks removed everywhere
    ("3.5", "3.5"),                              # a period before a digit stays
    ("yes.", "yes"),
    ("e.g.", "eg"),
    ("none", "0"),
    ("Ten", "10"),
    ("an apple", "apple"),
    ("a/b", "b"),                                # "/" becomes a space, then the article "a" goes
    ("dont", "don't"),
    ("couldn'tve", "couldn't've"),
    ("couldntve", "couldntve"),                  # two apostrophes missing: not in the official table
    ("Im", "im"),                                # the official key is "Im", lowercased text never matches it
    ("shed", "shed"),
    ("  yes\tsir\n", "yes sir"),
    ("(red)", "red"),
])
def test_normalization_known_values(raw, normalized):
    assert normalize_answer(raw) == normalized


def test_contraction_table():
    assert len(CONTRACTIONS) == 114
    assert CONTRACTIONS["yall'll"] == CONTRACTIONS["y'allll"] == "y'all'll"
    assert CONTRACTIONS["ow's'at"] == CONTRACTIONS["'ows'at"] == CONTRACTIONS["'ow'sat"] == "'ow's'at"
    assert CONTRACTIONS["twas"] == "'twas" and CONTRACTIONS["somebody'd"] == "somebodyd"
    assert not {"its", "were", "well", "lets", "ill", "shes"} & set(CONTRACTIONS)


def official_leave_one_out(prediction: str, answers: list[str]) -> float:
    """The server's score: min(matches among nine / 3, 1) averaged over every set of nine of the ten."""
    normalized = [normalize_answer(answer) for answer in answers]
    subsets = list(itertools.combinations(range(len(answers)), len(answers) - 1))
    predicted = normalize_answer(prediction)
    return sum(min(sum(normalized[i] == predicted for i in subset) / 3, 1) for subset in subsets) / len(subsets)


@pytest.mark.parametrize(("matches", "plain", "leave_one_out"), [
    (0, 0.0, 0.0), (1, 1 / 3, 0.3), (2, 2 / 3, 0.6), (3, 1.0, 0.9), (4, 1.0, 1.0), (10, 1.0, 1.0),
])
def test_accuracy_known_values(matches, plain, leave_one_out):
    answers = ["yes"] * matches + ["no"] * (10 - matches)
    assert vqa_accuracy("Yes.", answers) == pytest.approx(plain)
    assert vqa_accuracy("Yes.", answers, leave_one_out=True) == pytest.approx(leave_one_out)


def test_leave_one_out_matches_brute_force():
    rng = random.Random(0)
    for _ in range(200):
        answers = [rng.choice(["two", "2", "three", "the cat", "cat", "red"]) for _ in range(10)]
        prediction = rng.choice(["2", "cat", "Red", "blue"])
        assert vqa_accuracy(prediction, answers, leave_one_out=True) == pytest.approx(
            official_leave_one_out(prediction, answers))


def test_both_sides_normalized():
    assert vqa_accuracy("2", ["two", "Two", "2."]) == 1.0
    assert vqa_accuracy("the cat", ["cat"]) == pytest.approx(1 / 3)


RECORDS = [
    {"question_id": 1, "answer": ["yes"] * 10},                                   # ALBEF json: a list
    {"question_id": 2, "answer": "two"},                                          # Visual Genome: one string
    {"question_id": 3, "answers": [{"answer": "red", "answer_id": i} for i in range(2)] + [{"answer": "blue"}]},
]


def test_evaluate_percent():
    predictions = {1: "yes", 2: "2", 3: "red"}
    assert evaluate(predictions, RECORDS) == pytest.approx(100 * (1 + 1 / 3 + 2 / 3) / 3)
    assert evaluate({1: "no", 2: "3", 3: "green"}, RECORDS) == 0.0


@pytest.mark.parametrize(("records", "predictions", "message"), [
    ([{"question_id": 1, "answer": ["a"]}, {"answer": ["b"]}], {1: "a"}, "VQA record 1 has no 'question_id'"),
    ([{"question_id": 7}], {7: "a"}, "question_id 7) has no 'answer' or 'answers'"),
    ([{"question_id": 7, "answer": []}], {7: "a"}, "empty answer list"),
    ([{"question_id": 7, "answer": ["a"]}], {}, "no prediction for question_id 7 (VQA record 0)"),
    ([{"question_id": 7, "answer": ["a"]}], {"7": "a"}, "no prediction for question_id 7"),
    ([{"question_id": 7, "answer": ["a"]}], {7: "a", 8: "b"}, "question_id 8"),
    ([{"question_id": 7, "answer": ["a"]}, {"question_id": 7, "answer": ["a"]}], {7: "a"}, "share question_id 7"),
    ([], {}, "empty"),
])
def test_evaluate_errors_name_the_record(records, predictions, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        evaluate(predictions, records)


def test_evalai_round_trip(tmp_path):
    path = write_evalai_results(tmp_path / "out" / "vqa_test.json", [(np.int64(5), "yes"), ("6", "2")],
                                expected_question_ids=[5, 6])
    assert json.loads(path.read_text()) == [{"question_id": 5, "answer": "yes"}, {"question_id": 6, "answer": "2"}]
    assert isinstance(json.loads(path.read_text())[0]["question_id"], int)


@pytest.mark.parametrize(("results", "expected", "message"), [
    ([(5, "yes"), (5, "no")], None, "question_id 5 appears twice"),
    ([("q5", "yes")], None, "'q5' is not an integer"),
    ([(5, 3)], None, "answer for question_id 5 is not a string"),
    ([(5, "yes")], [5, 9, 12], "miss 2 expected questions, e.g. question_id 9"),
])
def test_evalai_errors(tmp_path, results, expected, message):
    with pytest.raises(ValueError, match=message):
        write_evalai_results(tmp_path / "results.json", results, expected_question_ids=expected)
