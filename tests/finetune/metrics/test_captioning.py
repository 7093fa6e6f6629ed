"""Caption metrics: tokenizer outputs, BLEU and CIDEr-D against hand-computed values of the published formulas,
and against pycocoevalcap's own scorers (and its Java PTB tokenizer, where java is installed) on fixed inputs."""

from __future__ import annotations

import math
import random
import shutil

import pytest

from finetune.metrics.captioning import bleu, cider_d, evaluate, tokenize

CAPTIONS = {
    "A man's dog, running on the beach.": "a man 's dog running on the beach",
    "Two dogs don't play-fight!": "two dogs do n't play-fight",
    'A "red" car near 3.5 trees; a cat: yes?': "a red car near 3.5 trees a cat yes",
    "it's a child's toy -- and... more": "it 's a child 's toy and more",
    "The cats' bowls": "the cats bowls",
    "I can't won't": "i ca n't wo n't",
    "e-mail U.S. at 5pm": "e-mail u.s. at 5pm",
    "He said 'hello' there": "he said hello there",
    "$5 for 50% off": "$ 5 for 50 % off",
    "cannot gonna": "can not gon na",
    "A man\u2019s \u201cdog\u201d.": "a man 's dog",
    "the 1,000 people at 5:30 p.m.": "the 1,000 people at 5:30 p.m.",
    "You're, we'll, I'd, they've, I'm": "you 're we 'll i 'd they 've i 'm",
    "- starting dash": "starting dash",
    "a dog!!": "a dog !!",
    "A group of people standing around a table with food.": "a group of people standing around a table with food",
}


@pytest.mark.parametrize(("caption", "tokens"), list(CAPTIONS.items()))
def test_tokenize_known_values(caption, tokens):
    assert " ".join(tokenize(caption)) == tokens


def test_tokenize_equals_coco_ptb_tokenizer():
    pytest.importorskip("pycocoevalcap")
    if shutil.which("java") is None:
        pytest.skip("java is not installed; coco-caption's PTB tokenizer runs on it")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenized = PTBTokenizer().tokenize({i: [{"caption": caption}] for i, caption in enumerate(CAPTIONS)})
    assert [tokenized[i][0] for i in range(len(CAPTIONS))] == list(CAPTIONS.values())


def words(text: str) -> list[str]:
    return text.split()


def test_bleu_hand_computed():
    # unigrams 5/6, bigrams 3/5, trigrams 1/4, 4-grams 0/3; equal lengths, no brevity penalty
    scores = bleu([words("the cat sat on the mat")], [[words("the cat is on the mat")]])
    assert scores[:3] == pytest.approx([5 / 6, math.sqrt(5 / 6 * 3 / 5), (5 / 6 * 3 / 5 * 1 / 4) ** (1 / 3)])
    assert scores[3] == pytest.approx((5 / 6 * 3 / 5 * 1 / 4 * 1e-15 / 3) ** (1 / 4))  # coco's 1e-15, not 0


def test_bleu_brevity_penalty_and_closest_reference():
    scores = bleu([words("the cat")], [[words("the cat sat down")]])
    assert scores[:2] == pytest.approx([math.exp(1 - 4 / 2)] * 2)
    # lengths 2 and 4 are equally close to 3: the shorter is taken, so no penalty
    assert bleu([words("the cat sat")], [[words("the cat"), words("the cat sat on")]])[0] == pytest.approx(1.0)
    # corpus level: lengths add up before one penalty (2 + 4 words against 4 + 4)
    corpus = bleu([words("a b"), words("c d e f")], [[words("a b x y")], [words("c d e f")]])
    assert corpus[0] == pytest.approx(math.exp(1 - 8 / 6))


def test_bleu_clips_counts_by_the_maximum_reference_count():
    scores = bleu([words("the the the the")], [[words("the cat"), words("the the dog")]])
    assert scores[0] == pytest.approx(2 / 4)  # "the" counts twice at most; 4 words > 3, so no brevity penalty


def test_cider_hand_computed():
    # Two images, one reference each, log(2) for every n-gram seen once: a perfect caption has cosine 1
    # for 1- and 2-grams and 0 for the empty 3- and 4-gram vectors: 10 * (1 + 1 + 0 + 0) / 4 = 5.
    score, per_image = cider_d([words("a b"), words("c d")], [[words("a b")], [words("c d")]])
    assert per_image == pytest.approx([5.0, 5.0]) and score == pytest.approx(5.0)
    # "a b c" against "a b": unigram cosine 2/sqrt(6), bigram 1/sqrt(2), bigram counts 2 vs 1
    score, per_image = cider_d([words("a b c"), words("c d")], [[words("a b")], [words("c d")]])
    first = 10 * (2 / math.sqrt(6) + 1 / math.sqrt(2)) / 4 * math.exp(-1 / 72)
    assert per_image == pytest.approx([first, 5.0])
    assert score == pytest.approx((first + 5.0) / 2)


def test_cider_common_ngrams_weigh_nothing():
    # "a" is in every image's references: log(2) - log(2) = 0 weight; only "b" and "c" count
    score, per_image = cider_d([words("a"), words("a")], [[words("a b")], [words("a c")]])
    assert per_image == [0.0, 0.0]


REFERENCES = {
    1: ["A man riding a wave on top of a surfboard.", "A surfer rides a large wave in the ocean.",
        "A person on a surfboard riding a wave.", "Man surfing on a big wave.", "A surfer catching a wave."],
    2: ["Two giraffes standing next to each other in a field.", "A pair of giraffes in a grassy field.",
        "Two giraffes are standing in the grass.", "Giraffes stand together near some trees.",
        "Two tall giraffes in an open field."],
    3: ["A plate of food with broccoli and rice.", "Rice, broccoli and chicken on a white plate.",
        "A dinner plate holds chicken, rice and vegetables.", "A plate with rice and broccoli on it."],
    4: ["A red stop sign on a street corner.", "A stop sign at the intersection of two streets.",
        "The stop sign is red and white."],
    5: ["A cat sleeping on a laptop keyboard.", "A cat lies on top of a laptop computer."],
}
PREDICTIONS = {1: "a man riding a wave on a surfboard", 2: "two giraffes standing in a field",
               3: "a plate of rice and broccoli", 4: "a stop sign on the corner of a street",
               5: "a dog sitting on a couch"}


def test_evaluate_equals_pycocoevalcap():
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    references = {key: [" ".join(tokenize(caption)) for caption in captions] for key, captions in REFERENCES.items()}
    predictions = {key: [" ".join(tokenize(caption))] for key, caption in PREDICTIONS.items()}
    coco_bleu, _ = Bleu(4).compute_score(references, predictions, verbose=0)
    coco_cider, _ = Cider().compute_score(references, predictions)
    ours = evaluate(PREDICTIONS, REFERENCES)
    assert [ours[f"bleu_{n}"] for n in range(1, 5)] == pytest.approx(coco_bleu, abs=1e-12)
    assert ours["cider"] == pytest.approx(coco_cider, abs=1e-12)


def test_random_corpora_equal_pycocoevalcap():
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    for seed in range(40):
        rng = random.Random(seed)
        vocabulary = ["a", "b", "c", "d", "e", "f", "g"][:rng.randint(2, 7)]
        images = rng.randint(1, 6)
        predictions = [[rng.choice(vocabulary) for _ in range(rng.randint(0, 9))] for _ in range(images)]
        references = [[[rng.choice(vocabulary) for _ in range(rng.randint(1, 10))] for _ in range(rng.randint(1, 5))]
                      for _ in range(images)]
        coco_references = {i: [" ".join(reference) for reference in references[i]] for i in range(images)}
        coco_predictions = {i: [" ".join(predictions[i])] for i in range(images)}
        coco_bleu, _ = Bleu(4).compute_score(coco_references, coco_predictions, verbose=0)
        coco_cider, coco_per_image = Cider().compute_score(coco_references, coco_predictions)
        assert bleu(predictions, references) == pytest.approx(coco_bleu, abs=1e-12), seed
        score, per_image = cider_d(predictions, references)
        assert score == pytest.approx(coco_cider, abs=1e-12), seed
        assert per_image == pytest.approx(list(coco_per_image), abs=1e-12), seed


def test_evaluate_pinned_values():
    scores = evaluate(PREDICTIONS, REFERENCES)
    # the values pycocoevalcap 1.2 gives on these inputs (test_evaluate_equals_pycocoevalcap)
    assert scores == pytest.approx({"bleu_1": 0.8391830293983487, "bleu_2": 0.7342851507218067,
                                    "bleu_3": 0.6016154426707631, "bleu_4": 0.4161076843212981,
                                    "cider": 1.945784822006912}, abs=1e-12)
    assert scores["cider"] > 1.0  # coco's scale: good captions of distinct images score above 1
    perfect = evaluate({key: captions[0] for key, captions in REFERENCES.items()}, REFERENCES)
    assert perfect["bleu_4"] == pytest.approx(1.0) and perfect["cider"] > scores["cider"]


@pytest.mark.parametrize(("predictions", "references", "message"), [
    ({}, {1: ["a cat"]}, "1 images have no predicted caption, e.g. image id 1"),
    ({1: "a cat", 2: "a dog"}, {1: ["a cat"]}, "no references, e.g. image id 2"),
    ({1: "a cat"}, {1: []}, "references of image id 1 must be a non-empty list"),
    ({1: "a cat"}, {1: "a cat"}, "references of image id 1 must be a non-empty list"),
    ({1: None}, {1: ["a cat"]}, "prediction for image id 1 is not a string"),
    ({}, {}, "evaluation split is empty"),
])
def test_evaluate_errors(predictions, references, message):
    with pytest.raises(ValueError, match=message):
        evaluate(predictions, references)
