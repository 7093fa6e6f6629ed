"""Extra text tokens beyond BERT's words, and the id each one gets.

Two kinds, each listed as a named group:

- ``MappedTokens``: tokens that take over BERT's reserved ``[unusedN]`` slots, so the vocabulary keeps
  its size and a released checkpoint loads as it is (PEVL: ``@@``, ``[pos_0]``..``[pos_511]``, ``##``
  on ``[unused200]``..``[unused713]``; ``pevl_position_tokens()`` gives these groups).
- ``AppendedTokens``: tokens numbered after the vocabulary (MVPTR's phrase concepts); the model's
  embedding table must then grow to the tokenizer's ``vocab_size`` (``FusionBert.resize_token_embeddings``).

``resolve_extra_tokens(groups, vocabulary, base_size)`` checks the groups against a vocabulary and
gives each token its id and each group its id range; the tokenizer (``pretrain.text.tokenizer``) does
this when built with ``extra_tokens=``::

    tokenizer = build_tokenizer(bert_dir, max_length=40, extra_tokens=pevl_position_tokens())
    tokenizer.token_id("[pos_3]")        # 209 for bert-base-uncased: [unused204]
    tokenizer.group_ids("position")      # range(206, 718)
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

_UNUSED_SLOT = re.compile(r"\[unused(\d+)\]")


@dataclass(frozen=True)
class MappedTokens:
    """``tokens`` in order onto the slots ``[unused{first_unused}]``, ``[unused{first_unused + 1}]``, ..."""

    group: str
    tokens: tuple[str, ...]
    first_unused: int

    def __post_init__(self):
        _check_group(self.group, self.tokens)
        object.__setattr__(self, "tokens", tuple(self.tokens))
        if self.first_unused < 0:
            raise ValueError(f"extra-token group {self.group!r}: first_unused {self.first_unused} is negative")

    def slot_names(self) -> list[str]:
        return [f"[unused{self.first_unused + index}]" for index in range(len(self.tokens))]


@dataclass(frozen=True)
class AppendedTokens:
    """``tokens`` in order after the vocabulary (and after any earlier appended group)."""

    group: str
    tokens: tuple[str, ...]

    def __post_init__(self):
        _check_group(self.group, self.tokens)
        object.__setattr__(self, "tokens", tuple(self.tokens))


ExtraTokenGroup = MappedTokens | AppendedTokens


def _check_group(group: str, tokens: Sequence[str]) -> None:
    if not isinstance(group, str) or not group:
        raise ValueError(f"an extra-token group needs a non-empty name, got {group!r}")
    if isinstance(tokens, str) or not tokens:
        raise ValueError(f"extra-token group {group!r} needs a non-empty sequence of token strings, got {tokens!r}")


def pevl_position_tokens(num_bins: int = 512, first_unused: int = 200) -> tuple[MappedTokens, ...]:
    """PEVL's tokens: ``box_open`` ``@@``, ``position`` ``[pos_0]``..``[pos_{num_bins-1}]``, ``box_close`` ``##``,
    on consecutive ``[unusedN]`` slots from ``first_unused`` (PEVL's layout: 200, 201.., 200 + num_bins + 1)."""
    return (
        MappedTokens("box_open", ("@@",), first_unused),
        MappedTokens("position", tuple(f"[pos_{index}]" for index in range(num_bins)), first_unused + 1),
        MappedTokens("box_close", ("##",), first_unused + 1 + num_bins),
    )


@dataclass(frozen=True)
class ResolvedExtraTokens:
    """The ids of extra tokens: ``ids`` token -> id, ``groups`` group -> id range, ``appended`` = ids added."""

    ids: dict[str, int]
    groups: dict[str, range]
    appended: int


def resolve_extra_tokens(
    groups: Sequence[ExtraTokenGroup], vocabulary: Mapping[str, int], base_size: int
) -> ResolvedExtraTokens:
    """Ids for ``groups`` given a tokenizer's ``vocabulary`` (token -> id) of ``base_size`` ids.

    Errors, each naming the group and token: two groups with one name; a token listed twice; a token the
    vocabulary already has (its text would change ids); a slot past the vocabulary's last ``[unusedN]``;
    a slot taken by two groups; a mapped group whose slots are not consecutive ids.
    """
    ids: dict[str, int] = {}
    ranges: dict[str, range] = {}
    owner_of_token: dict[str, str] = {}
    owner_of_slot: dict[str, str] = {}
    next_appended = base_size
    for group in groups:
        if not isinstance(group, MappedTokens | AppendedTokens):
            raise TypeError(f"extra tokens come as MappedTokens or AppendedTokens groups, got {group!r}")
        if group.group in ranges:
            raise ValueError(f"two extra-token groups are named {group.group!r}; give each group its own name")
        for token in group.tokens:
            if token in owner_of_token:
                raise ValueError(
                    f"extra token {token!r} is listed in group {owner_of_token[token]!r} and again in "
                    f"{group.group!r}; list it once"
                )
            if token in vocabulary:
                raise ValueError(
                    f"extra token {token!r} (group {group.group!r}) is already in the vocabulary as id "
                    f"{vocabulary[token]}; protecting it would change the ids of ordinary text, so give it "
                    "a name the vocabulary does not have"
                )
            owner_of_token[token] = group.group
        if isinstance(group, MappedTokens):
            group_ids = _slot_ids(group, vocabulary, owner_of_slot)
        else:
            group_ids = list(range(next_appended, next_appended + len(group.tokens)))
            next_appended += len(group.tokens)
        ids.update(zip(group.tokens, group_ids, strict=True))
        ranges[group.group] = range(group_ids[0], group_ids[-1] + 1)
    return ResolvedExtraTokens(ids=ids, groups=ranges, appended=next_appended - base_size)


def _slot_ids(group: MappedTokens, vocabulary: Mapping[str, int], owner_of_slot: dict[str, str]) -> list[int]:
    slots = group.slot_names()
    for slot in slots:
        if slot not in vocabulary:
            available = sorted(int(found[1]) for name in vocabulary if (found := _UNUSED_SLOT.fullmatch(name)))
            last = f"its last is [unused{available[-1]}]" if available else "it has none"
            raise ValueError(
                f"extra-token group {group.group!r} needs {len(slots)} slots from {slots[0]} on, but the "
                f"vocabulary has no {slot} ({last}); start the group lower or append its tokens after the "
                "vocabulary (AppendedTokens)"
            )
        if slot in owner_of_slot:
            raise ValueError(
                f"extra-token groups {owner_of_slot[slot]!r} and {group.group!r} both map onto {slot}; "
                "give them slots that do not overlap"
            )
        owner_of_slot[slot] = group.group
    slot_ids = [vocabulary[slot] for slot in slots]
    for index in range(1, len(slots)):
        if slot_ids[index] != slot_ids[index - 1] + 1:
            raise ValueError(
                f"extra-token group {group.group!r} spans {slots[index - 1]} (id {slot_ids[index - 1]}) and "
                f"{slots[index]} (id {slot_ids[index]}), which are not consecutive ids; a group must be one id "
                "range, so start it past the gap"
            )
    return slot_ids
