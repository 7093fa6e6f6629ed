"""Finding markers (extra tokens such as ``@@``, ``[pos_12]``, ``##``) inside a text.

Caption cleaning must leave markers untouched and the tokenizer must give each marker its own id
instead of WordPiece pieces; both first cut the text into plain pieces and markers with one
``MarkerSet``::

    markers = MarkerSet(["@@", "##", "[pos_1]"])
    markers.split("dog @@ [pos_1] ##")  # [("dog ", False), ("@@", True), (" ", False), ("[pos_1]", True),
                                         #  (" ", False), ("##", True)]

A marker is found wherever it occurs, also glued to a word (``"dog@@"``); where several markers start at
the same character the longest wins. Markers hold no whitespace, so word splitting never cuts one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable


class MarkerSet:
    """A fixed set of marker strings and the splitting of texts at them. Picklable, for loader workers."""

    def __init__(self, markers: Iterable[str] = ()):
        markers = frozenset(markers)
        for marker in markers:
            if not isinstance(marker, str) or not marker:
                raise ValueError(f"a marker must be a non-empty string, got {marker!r}")
            if any(character.isspace() for character in marker):
                raise ValueError(
                    f"marker {marker!r} contains whitespace; cleaning splits words at whitespace and would cut "
                    "it, so give it a name without spaces"
                )
        self.markers = markers
        # Longest first, so that a marker that is a prefix of another ("[pos_1" / "[pos_12]") never wins
        # over the longer one.
        self._lengths = tuple(sorted({len(marker) for marker in markers}, reverse=True))
        # Captions rarely hold a marker's first character, so the scan jumps between such characters
        # instead of testing every position (MVPTR's phrase vocabulary has tens of thousands of markers).
        first_characters = "".join(sorted({marker[0] for marker in markers}))
        self._candidate = re.compile(f"[{re.escape(first_characters)}]") if markers else None

    def __len__(self) -> int:
        return len(self.markers)

    def __contains__(self, text: object) -> bool:
        return text in self.markers

    def split(self, text: str) -> list[tuple[str, bool]]:
        """``text`` as consecutive ``(piece, is_marker)`` pairs whose pieces join back to ``text``; no empty piece."""
        pieces = []
        plain_start = 0
        position = 0
        while self._candidate is not None:
            found = self._candidate.search(text, position)
            if found is None:
                break
            position = found.start()
            marker = self._marker_at(text, position)
            if marker is None:
                position += 1
                continue
            if plain_start < position:
                pieces.append((text[plain_start:position], False))
            pieces.append((marker, True))
            position += len(marker)
            plain_start = position
        if plain_start < len(text):
            pieces.append((text[plain_start:], False))
        return pieces

    def _marker_at(self, text: str, position: int) -> str | None:
        for length in self._lengths:
            candidate = text[position : position + length]
            if candidate in self.markers:
                return candidate
        return None
