"""VQA accuracy with the official answer normalisation, and the EvalAI results file.

``normalize_answer`` follows the official VQA evaluation (``vqaEval.py``): newlines and tabs become spaces;
punctuation marks are removed where they touch a space (or anywhere when the text holds a digit-comma-digit
group) and replaced by a space otherwise; periods not followed by a digit are removed; the text is lowercased;
number words ``none``/``zero``..``ten`` become digits; the articles ``a``, ``an``, ``the`` are dropped; and
contractions written without their apostrophes get them back (``dont`` -> ``don't``).

``vqa_accuracy`` scores one prediction against the human answers: ``min(matches / 3, 1)``. With
``leave_one_out=True`` it is the official server's variant, the same score averaged over the ten subsets of nine
of the ten annotators (an answer given by 3 of 10 people scores 0.9 instead of 1).

The official script normalises the ground-truth answers only partly (punctuation only, and only when the
annotators disagree) because the answers in its annotation files are already normalised. Here both sides go
through ``normalize_answer``, which gives the same scores on those files and also handles raw answer lists
(Visual Genome, ALBEF's json, synthetic data).

Run from Python::

    accuracy = evaluate({question_id: answer, ...}, records)   # records: [{"question_id", "answer": [..]}]
    write_evalai_results("results/vqa_test.json", predictions.items())
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!"]
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# The official pattern "(?!<=\d)(\.)(?!\d)" meant a lookbehind, but its "(?!<=\d)" is a lookahead that always
# holds at a period, so the rule in effect is: remove every period not followed by a digit.
_PERIOD = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}

# Contractions the official table restores. Its keys are these words with exactly one apostrophe left out
# (so "couldn't've" is restored from "couldnt've" and "couldn'tve", not from "couldntve"). Words whose
# apostrophe-less form is an English word of its own (she'd/shed, we're/were, it's/its, ...) are not restored,
# and its "I'm", "I've", "I'd've" entries have capitalised keys that never match lowercased text.
_CONTRACTED_WORDS = [
    "ain't", "aren't", "can't", "could've", "couldn't", "couldn't've", "didn't", "doesn't", "don't", "hadn't",
    "hadn't've", "hasn't", "haven't", "he'd", "he'd've", "he's", "how'd", "how'll", "how's", "isn't", "it'd",
    "it'd've", "it'll", "ma'am", "mightn't", "mightn't've", "might've", "mustn't", "must've", "needn't", "not've",
    "o'clock", "oughtn't", "'ow's'at", "shan't", "she'd've", "should've", "shouldn't", "shouldn't've",
    "somebody'd've", "somebody'll", "somebody's", "someone'd", "someone'd've", "someone'll", "someone's",
    "something'd", "something'd've", "something'll", "that's", "there'd", "there'd've", "there're", "there's",
    "they'd", "they'd've", "they'll", "they're", "they've", "'twas", "wasn't", "we'd've", "we've", "weren't",
    "what'll", "what're", "what's", "what've", "when's", "where'd", "where's", "where've", "who'd", "who'd've",
    "who'll", "who's", "who've", "why'll", "why're", "why's", "won't", "would've", "wouldn't", "wouldn't've", "y'all",
    "y'all'll", "y'all'd've", "you'd", "you'd've", "you'll", "you're", "you've",
]


def _contraction_table() -> dict[str, str]:
    table = {}
    for word in _CONTRACTED_WORDS:
        for position, character in enumerate(word):
            if character == "'":
                table[word[:position] + word[position + 1:]] = word
    table["somebody'd"] = "somebodyd"  # the official table maps this one backwards; kept for equal scores
    return table


CONTRACTIONS = _contraction_table()


def _process_punctuation(text: str) -> str:
    # Tests look at the original text while replacements accumulate, as the official loop does.
    output = text
    strip_everywhere = _DIGIT_COMMA_DIGIT.search(text) is not None
    for mark in _PUNCTUATION:
        if strip_everywhere or mark + " " in text or " " + mark in text:
            output = output.replace(mark, "")
        else:
            output = output.replace(mark, " ")
    return _PERIOD.sub("", output)


def normalize_answer(answer: str) -> str:
    """The official VQA normalisation of one answer (see the module docstring)."""
    text = _process_punctuation(answer.replace("\n", " ").replace("\t", " ").strip())
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def vqa_accuracy(prediction: str, answers: Sequence[str], leave_one_out: bool = False) -> float:
    """Score in [0, 1] of ``prediction`` against the human ``answers`` (both normalised here).

    Default: ``min(#answers equal to the prediction / 3, 1)``. ``leave_one_out``: the mean of that score over
    every subset that leaves one annotator out, as the official evaluation server computes it.
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one ground-truth answer")
    predicted = normalize_answer(prediction)
    matches = [normalize_answer(answer) == predicted for answer in answers]
    if not leave_one_out:
        return min(sum(matches) / 3, 1.0)
    total = sum(matches)
    return sum(min((total - left_out) / 3, 1.0) for left_out in matches) / len(matches)


def _record_answers(record: Mapping, position: int) -> list[str]:
    name = f"VQA record {position} (question_id {record['question_id']!r})"
    if "answers" in record:
        answers = record["answers"]
    elif "answer" in record:
        answers = record["answer"]
    else:
        raise ValueError(f"{name} has no 'answer' or 'answers' field; evaluation needs the human answers")
    if isinstance(answers, str):
        answers = [answers]
    if not answers:
        raise ValueError(f"{name} has an empty answer list")
    texts = []
    for answer in answers:
        if isinstance(answer, Mapping):
            answer = answer.get("answer")
        if not isinstance(answer, str):
            raise ValueError(f"{name} has an answer that is not a string: {answer!r}")
        texts.append(answer)
    return texts


def evaluate(predictions: Mapping, records: Sequence[Mapping], leave_one_out: bool = False) -> float:
    """Mean VQA accuracy in percent of ``predictions`` (question_id -> answer) over ``records``.

    A record holds ``question_id`` and the human answers as ``answer`` (ALBEF's json: a list, or one string for
    Visual Genome) or ``answers`` (the official annotations: dicts with an ``answer`` field, or strings).
    Every record needs exactly one prediction and every prediction a record; a mismatch is an error naming it.
    """
    if not records:
        raise ValueError("no VQA record to evaluate; the evaluation split is empty")
    seen: dict = {}
    scores = []
    for position, record in enumerate(records):
        if "question_id" not in record:
            raise ValueError(f"VQA record {position} has no 'question_id' (fields: {sorted(record)})")
        question_id = record["question_id"]
        if question_id in seen:
            raise ValueError(f"VQA records {seen[question_id]} and {position} share question_id {question_id!r}")
        seen[question_id] = position
        answers = _record_answers(record, position)
        if question_id not in predictions:
            raise ValueError(f"no prediction for question_id {question_id!r} (VQA record {position})")
        prediction = predictions[question_id]
        if not isinstance(prediction, str):
            raise ValueError(f"the prediction for question_id {question_id!r} is not a string: {prediction!r}")
        scores.append(vqa_accuracy(prediction, answers, leave_one_out))
    unknown = [question_id for question_id in predictions if question_id not in seen]
    if unknown:
        raise ValueError(f"{len(unknown)} predictions have no VQA record, e.g. question_id {unknown[0]!r}")
    return 100.0 * sum(scores) / len(scores)


def write_evalai_results(path: str | Path, results: Iterable[tuple[int, str]],
                         expected_question_ids: Iterable[int] | None = None) -> Path:
    """Write ``[{"question_id": int, "answer": str}, ...]``, the file the EvalAI VQA server takes.

    The server rejects a file that misses a test question; ``expected_question_ids`` checks that here.
    """
    entries = evalai_entries(results, expected_question_ids)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entries))
    return path


def evalai_entries(results: Iterable[tuple[int, str]], expected_question_ids: Iterable[int] | None = None) -> list:
    """The checked entries of an EvalAI results file (``ValueError`` naming the first bad one), nothing written."""
    entries, seen = [], set()
    for question_id, answer in results:
        try:
            number = int(question_id)
        except (TypeError, ValueError):
            raise ValueError(f"question_id {question_id!r} is not an integer; EvalAI needs integer ids") from None
        if number in seen:
            raise ValueError(f"question_id {number} appears twice in the results")
        if not isinstance(answer, str):
            raise ValueError(f"the answer for question_id {number} is not a string: {answer!r}")
        seen.add(number)
        entries.append({"question_id": number, "answer": answer})
    if expected_question_ids is not None:
        missing = sorted({int(question_id) for question_id in expected_question_ids} - seen)
        if missing:
            raise ValueError(f"the results miss {len(missing)} expected questions, e.g. question_id {missing[0]}; "
                             "EvalAI needs an answer for every test question")
    return entries
