"""ALBEF caption cleaning."""

from pretrain.text_processing import pre_caption


def test_pre_caption_rules():
    assert pre_caption("A Red-circle, left/of (the) <person>!!  ") == "a red circle left of the person"
    assert pre_caption("one two three four", max_words=2) == "one two"
    assert pre_caption("it's: a ~test~; #1?") == "its a test 1"
