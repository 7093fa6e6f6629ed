"""PEVL's position tokens in text: boxes quantised to bins, written into captions right after their phrase.

A box ``[x1, y1, x2, y2]`` in pixels of the image the model sees becomes four bins out of ``num_bins`` (512)
and the marker text ``@@ [pos_x1] [pos_y1] [pos_x2] [pos_y2] ##``; ``insert_positions`` writes one such marker
after each grounded phrase, found by its character span in the caption (MDETR's ``tokens_positive``)::

    bins = quantise_box([10.0, 20.0, 100.0, 255.9], width=256, height=256)   # [20, 40, 200, 511]
    insert_positions("a dog on a mat", [(0, 5)], [bins])
    # 'a dog  @@  [pos_20] [pos_40] [pos_200] [pos_511]  ## on a mat'  (cleaning collapses the spaces)
    box = dequantise_box([20, 40, 200, 511], width=256, height=256)          # [10.0, 20.0, 100.0, 255.5]

The rules are PEVL's (``dataset/grounding_dataset.py`` of thunlp/PEVL):

- **Quantisation**: ``int(value * num_bins / size)``, the product taken first, truncated toward zero, then
  clamped to ``[0, num_bins - 1]`` (a coordinate on the right or bottom border, ``value == size``, is bin 511).
  Boxes have been clipped to the image before, so the lower clamp only guards against float noise.
- **Dequantisation** (PEVL's grounding inference): ``bin / num_bins * size``, the lower edge of the bin.
- **Insertion**: spans are taken in the order given (PEVL never sorts them). The text before the first span
  is kept; then, for each span, its phrase, its marker, and the text from its end up to the start of the next
  span (nothing when the next span starts before this one ends). So overlapping spans repeat the overlapped
  characters, adjacent spans follow each other directly, and a span listed twice writes its phrase twice.
  Spans that are identical share one marker: the box listed last (PEVL keys markers by span).
  PEVL keys them by the string ``str(start) + str(end)``, so two different spans such as (1, 234) and
  (12, 34) collide there and both get the later box; here each span keeps its own box.
- The marker carries PEVL's padding (``"  @@  [pos_a] ... [pos_d]  ## "``); caption cleaning collapses it,
  so the cleaned pseudo-caption is PEVL's exactly.

A horizontal flip is applied before insertion, by the loader (``data_shards.boxes.transform_meta``): boxes
move, the words left/right swap and region spans are remapped into the swapped caption. PEVL swaps after
insertion by plain substring replacement ("bright" becomes "bleft"); here only whole words swap.
"""

from __future__ import annotations

from collections.abc import Sequence

from pretrain.text.extra_tokens import MappedTokens, pevl_position_tokens

NUM_BINS = 512
FIRST_UNUSED = 200  # PEVL's layout: @@ on [unused200], [pos_0].. from [unused201], ## on [unused712 + 1]
BOX_OPEN, BOX_CLOSE = "@@", "##"
# VRD pads predicates to three tokens with ``[unrel]``, on the slot after ``##`` (PEVL's run_vrd_train.py).
UNRELATED = "[unrel]"


def position_token(index: int) -> str:
    return f"[pos_{index}]"


def pevl_token_groups(num_bins: int = NUM_BINS, first_unused: int = FIRST_UNUSED,
                      unrelated: bool = False) -> tuple[MappedTokens, ...]:
    """The extra-token groups of PEVL's tokenizer: ``box_open``, ``position``, ``box_close`` and, for VRD,
    ``unrelated`` (``[unrel]`` on the slot after ``##``)."""
    groups = pevl_position_tokens(num_bins, first_unused)
    if unrelated:
        groups += (MappedTokens("unrelated", (UNRELATED,), first_unused + num_bins + 2),)
    return groups


def quantise(value: float, size: float, num_bins: int = NUM_BINS) -> int:
    """One coordinate in pixels of an image side of ``size`` pixels -> its bin (see the module docstring)."""
    if size <= 0:
        raise ValueError(f"image side must be positive, got {size}")
    return min(max(int(value * num_bins / size), 0), num_bins - 1)


def quantise_box(box: Sequence[float], width: float, height: float, num_bins: int = NUM_BINS) -> list[int]:
    """An xyxy pixel box -> ``[bin_x1, bin_y1, bin_x2, bin_y2]``."""
    if len(box) != 4:
        raise ValueError(f"a box is [x1, y1, x2, y2], got {list(box)}")
    x1, y1, x2, y2 = (float(value) for value in box)
    return [quantise(x1, width, num_bins), quantise(y1, height, num_bins),
            quantise(x2, width, num_bins), quantise(y2, height, num_bins)]


def dequantise_box(bins: Sequence[int], width: float, height: float, num_bins: int = NUM_BINS) -> list[float]:
    """Four bins -> an xyxy pixel box (each bin's lower edge, PEVL's inference rule)."""
    x1, y1, x2, y2 = (int(value) for value in bins)
    return [x1 / num_bins * width, y1 / num_bins * height, x2 / num_bins * width, y2 / num_bins * height]


def marker_text(bins: Sequence[int]) -> str:
    """``"  @@  [pos_a] [pos_b] [pos_c] [pos_d]  ## "``: PEVL's marker, padding included."""
    return " ".join([f"  {BOX_OPEN} ", *(position_token(int(value)) for value in bins), f" {BOX_CLOSE} "])


def masked_marker_text(slots: int = 4, mask_token: str = "[MASK]") -> str:
    """The prompt's marker with every position slot masked: ``"  @@  [MASK] [MASK] [MASK] [MASK]  ## "``."""
    return " ".join([f"  {BOX_OPEN} ", *([mask_token] * slots), f" {BOX_CLOSE} "])


def insert_markers(caption: str, spans: Sequence[Sequence[int]], markers: Sequence[str]) -> str:
    """``caption`` with ``markers[i]`` written right after ``caption[spans[i][0]:spans[i][1]]`` (PEVL's rule,
    see the module docstring). Spans are character offsets into ``caption``, ``0 <= start < end <= len``."""
    if len(spans) != len(markers):
        raise ValueError(f"{len(spans)} spans but {len(markers)} markers; give one marker per span")
    if not spans:
        return caption
    spans = [(int(start), int(end)) for start, end in spans]
    for start, end in spans:
        if not 0 <= start < end <= len(caption):
            raise ValueError(f"span [{start}, {end}) does not lie inside the caption of {len(caption)} characters")
    # Identical spans share the marker listed last, as PEVL's span-keyed table does.
    marker_of = dict(zip(spans, markers, strict=True))
    pieces = [caption[: spans[0][0]]]
    for index, (start, end) in enumerate(spans):
        following = spans[index + 1][0] if index + 1 < len(spans) else len(caption)
        pieces += [caption[start:end], marker_of[(start, end)], caption[end:following]]
    return "".join(pieces)


def insert_positions(caption: str, spans: Sequence[Sequence[int]], bins: Sequence[Sequence[int]]) -> str:
    """``insert_markers`` with the position marker of each span's quantised box."""
    return insert_markers(caption, spans, [marker_text(box_bins) for box_bins in bins])


def with_position_tokens(tokenizer, *, num_bins: int = NUM_BINS, first_unused: int = FIRST_UNUSED,
                         unrelated: bool = False):
    """``tokenizer`` (a ``pretrain.text.tokenizer.TextTokenizer``) as PEVL's: the same vocabulary, length and
    [SEP] rule, plus the position tokens (and ``[unrel]`` for VRD) on their ``[unusedN]`` slots."""
    from pretrain.text.tokenizer import TextTokenizer

    groups = pevl_token_groups(num_bins, first_unused, unrelated)
    if tokenizer.extra_tokens == groups:
        return tokenizer
    if tokenizer.extra_tokens:
        raise ValueError(f"the tokenizer already has extra tokens {[group.group for group in tokenizer.extra_tokens]}"
                         "; PEVL's position tokens are added to a tokenizer without any")
    return TextTokenizer(tokenizer.tokenizer, max_length=tokenizer.max_length, trailing_sep=tokenizer.trailing_sep,
                         extra_tokens=groups)
