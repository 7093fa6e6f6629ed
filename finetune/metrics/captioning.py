"""Caption metrics as coco-caption (pycocoevalcap) computes them: BLEU-1..4 and CIDEr-D, plus its tokenisation.

``evaluate(predictions, references)`` tokenises every caption with ``tokenize`` and returns ``bleu_1`` ..
``bleu_4`` and ``cider`` in coco-caption's scale (fractions; papers print them x100, e.g. CIDEr 133.1 is 1.331).

- ``tokenize`` stands in for coco-caption's Stanford PTB tokenizer on plain English captions: lowercase; split off
  clitics (``man's`` -> ``man 's``, ``don't`` -> ``do n't``, ``cannot`` -> ``can not``), ``$`` and ``%``; drop the
  punctuation tokens coco-caption drops (``. , ; : ? ! ' " ` - -- ...``) and brackets. Hyphenated words, numbers
  (``3.5``, ``1,000``, ``5:30``) and dotted abbreviations (``u.s.``) stay whole. It differs from the Java
  tokenizer on abbreviations ending a word (``mr.`` -> ``mr``) and brackets (PTB keeps ``-lrb-``/``-rrb-``).
- ``bleu`` is corpus BLEU with coco-caption's options: n-gram counts clipped by their maximum count in any
  reference of the image, the reference length of each image being the one closest to the prediction's (the
  shorter one on a tie), one brevity penalty ``exp(1 - reference length / prediction length)`` over the corpus
  when the predictions are shorter, and the constants 1e-15 and 1e-9 that keep a zero count finite.
- ``cider_d`` is coco-caption's ``Cider`` (which is CIDEr-D): TF-IDF vectors of 1- to 4-grams with document
  frequencies counted over the images' reference sets (an n-gram counts once per image), the prediction's weights
  clipped to the reference's, a Gaussian length penalty with sigma 6, the cosine averaged over n and over the
  references, times 10. As in coco-caption, the length compared is the number of bigrams (words - 1).
  A perfect caption scores above 1 when its n-grams are rare among the other images.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence

_DROPPED_TOKENS = {"''", "'", "``", "`", '"', ".", "?", "!", ",", ":", ";", "-", "--", "...", "(", ")", "[", "]",
                   "{", "}"}
_LEADING = re.compile(r"^(``|[\"'`(\[{$])")
_TRAILING = re.compile(r"(''|\.\.\.|--|[!?]+|[\"'`)\]},;:%])$")
_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'m|'ll|'d)$")
_SPLIT_WORDS = {"cannot": ["can", "not"], "gonna": ["gon", "na"], "gotta": ["got", "ta"], "wanna": ["wan", "na"]}
_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'})


def _split_word(word: str) -> list[str]:
    before, after = [], []
    while len(word) > 1 and (match := _LEADING.match(word)):
        before.append(match.group(1))
        word = word[match.end():]
    while True:
        if (match := _TRAILING.search(word)) and match.start() > 0:
            after.insert(0, match.group(1))
            word = word[:match.start()]
        elif word.endswith(".") and len(word) > 1 and "." not in word[:-1]:
            # a sentence-final period; one inside the word marks an abbreviation or a number (u.s., 3.5)
            after.insert(0, ".")
            word = word[:-1]
        else:
            break
    if word in _SPLIT_WORDS:
        middle = list(_SPLIT_WORDS[word])
    elif match := _CLITIC.match(word):
        middle = [match.group(1), match.group(2)]
    else:
        middle = [word] if word else []
    return before + middle + after


def tokenize(caption: str) -> list[str]:
    """Lowercased word tokens of ``caption`` without punctuation, as coco-caption's PTB step gives them."""
    tokens = []
    for word in caption.translate(_QUOTES).lower().split():
        tokens.extend(token for token in _split_word(word) if token not in _DROPPED_TOKENS)
    return tokens


def _ngrams(words: Sequence[str], max_order: int) -> Counter:
    counts = Counter()
    for order in range(1, max_order + 1):
        for start in range(len(words) - order + 1):
            counts[tuple(words[start:start + order])] += 1
    return counts


def bleu(predictions: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]],
         max_order: int = 4) -> list[float]:
    """Corpus BLEU-1..``max_order`` of tokenised ``predictions``, each with its tokenised ``references``."""
    tiny, small = 1e-15, 1e-9  # coco-caption's: a zero match count gives ~0 instead of a division by zero
    matched, guessed = [0] * max_order, [0] * max_order
    prediction_length = reference_length = 0
    for words, image_references in zip(predictions, references, strict=True):
        clip = Counter()
        for reference in image_references:
            clip |= _ngrams(reference, max_order)  # maximum count of each n-gram over the references
        for ngram, count in _ngrams(words, max_order).items():
            matched[len(ngram) - 1] += min(count, clip[ngram])
        for order in range(1, max_order + 1):
            guessed[order - 1] += max(0, len(words) - order + 1)
        prediction_length += len(words)
        reference_length += min((abs(len(reference) - len(words)), len(reference))
                                for reference in image_references)[1]
    scores, product = [], 1.0
    for order in range(max_order):
        product *= (matched[order] + tiny) / (guessed[order] + small)
        scores.append(product ** (1 / (order + 1)))
    ratio = (prediction_length + tiny) / (reference_length + small)
    if ratio < 1:
        scores = [score * math.exp(1 - 1 / ratio) for score in scores]
    return scores


def _tfidf(counts: Counter, document_frequency: Counter, log_images: float, max_order: int):
    vectors = [{} for _ in range(max_order)]
    for ngram, term_frequency in counts.items():
        weight = term_frequency * (log_images - math.log(max(1.0, document_frequency[ngram])))
        vectors[len(ngram) - 1][ngram] = weight
    norms = [math.sqrt(sum(weight * weight for weight in vector.values())) for vector in vectors]
    bigrams = sum(count for ngram, count in counts.items() if len(ngram) == 2)
    return vectors, norms, bigrams


def cider_d(predictions: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]],
            max_order: int = 4, sigma: float = 6.0) -> tuple[float, list[float]]:
    """CIDEr-D of tokenised ``predictions``: the corpus score (mean) and the score of each image."""
    reference_counts = [[_ngrams(reference, max_order) for reference in image] for image in references]
    document_frequency = Counter()
    for image in reference_counts:
        document_frequency.update(set().union(*image))
    log_images = math.log(len(reference_counts))
    per_image = []
    for words, image in zip(predictions, reference_counts, strict=True):
        vectors, norms, length = _tfidf(_ngrams(words, max_order), document_frequency, log_images, max_order)
        total = 0.0
        for counts in image:
            reference_vectors, reference_norms, reference_length = _tfidf(counts, document_frequency, log_images,
                                                                          max_order)
            penalty = math.exp(-((length - reference_length) ** 2) / (2 * sigma ** 2))
            for order in range(max_order):
                reference_vector = reference_vectors[order]
                overlap = sum(min(weight, reference_vector.get(ngram, 0.0)) * reference_vector.get(ngram, 0.0)
                              for ngram, weight in vectors[order].items())
                if norms[order] != 0 and reference_norms[order] != 0:
                    overlap /= norms[order] * reference_norms[order]
                total += overlap * penalty / max_order
        per_image.append(10.0 * total / len(image))
    return sum(per_image) / len(per_image), per_image


def evaluate(predictions: Mapping[object, str], references: Mapping[object, Sequence[str]]) -> dict[str, float]:
    """``bleu_1`` .. ``bleu_4`` and ``cider`` of one predicted caption per image id against its references."""
    if not references:
        raise ValueError("no reference caption to evaluate against; the evaluation split is empty")
    missing = [image_id for image_id in references if image_id not in predictions]
    if missing:
        raise ValueError(f"{len(missing)} images have no predicted caption, e.g. image id {missing[0]!r}")
    unknown = [image_id for image_id in predictions if image_id not in references]
    if unknown:
        raise ValueError(f"{len(unknown)} predicted captions have no references, e.g. image id {unknown[0]!r}")
    image_ids = list(references)
    tokenized_predictions, tokenized_references = [], []
    for image_id in image_ids:
        prediction, captions = predictions[image_id], references[image_id]
        if not isinstance(prediction, str):
            raise ValueError(f"the prediction for image id {image_id!r} is not a string: {prediction!r}")
        if isinstance(captions, str) or not captions or not all(isinstance(caption, str) for caption in captions):
            raise ValueError(f"the references of image id {image_id!r} must be a non-empty list of strings, "
                             f"got {captions!r}")
        tokenized_predictions.append(tokenize(prediction))
        tokenized_references.append([tokenize(caption) for caption in captions])
    scores = {f"bleu_{order}": value
              for order, value in enumerate(bleu(tokenized_predictions, tokenized_references), start=1)}
    scores["cider"] = cider_d(tokenized_predictions, tokenized_references)[0]
    return scores
