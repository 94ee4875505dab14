"""Transcripts as the model sees them: normalised text and the character vocabulary of the CTC head.

:func:`normalize_transcript` only lowercases, removes punctuation and tidies whitespace; it does not
spell out digits or strip accents, so text that still holds such characters is caught by
:meth:`CharTokenizer.encode` (and reported by the corpus readers) instead of being silently changed.
"""

from __future__ import annotations

import string
import unicodedata
from collections.abc import Iterable

_APOSTROPHES = {"\u2019": "'", "\u2018": "'", "\u02bc": "'", "`": "'"}
"""Typographic apostrophes, mapped to the plain one the vocabulary holds."""


class TextError(ValueError):
    """A transcript or id sequence that the tokenizer cannot represent."""


def normalize_transcript(text: str) -> str:
    """Lowercase ``text``, drop punctuation other than the apostrophe, collapse whitespace.

    Dashes (``-``, en/em dash) separate words, so ``"twenty-one"`` becomes ``"twenty one"``; other
    punctuation (``. , ! ? " ; : ( )`` ...) is removed. Letters, digits and symbols outside the
    tokenizer's vocabulary are kept for :meth:`CharTokenizer.encode` to reject. Returns ``""`` when
    nothing is left.
    """
    out: list[str] = []
    for ch in unicodedata.normalize("NFC", text).lower():
        ch = _APOSTROPHES.get(ch, ch)
        category = unicodedata.category(ch)
        if ch == "'" or not category.startswith("P"):
            out.append(ch)
        elif category == "Pd":
            out.append(" ")
    return " ".join("".join(out).split())


class CharTokenizer:
    """Characters <-> integer ids for a CTC model: 0 is the blank, then space, apostrophe, a-z."""

    BLANK_TOKEN = "<blank>"

    def __init__(self) -> None:
        self.vocab: tuple[str, ...] = (self.BLANK_TOKEN, " ", "'", *string.ascii_lowercase)
        self._ids = {ch: i for i, ch in enumerate(self.vocab) if i != self.blank}

    @property
    def blank(self) -> int:
        """Id of the CTC blank."""
        return 0

    @property
    def vocab_size(self) -> int:
        """Number of output classes, blank included."""
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        """Ids of the characters of ``text`` (already normalised).

        Raises:
            TextError: ``text`` holds characters outside the vocabulary; the message lists them.
        """
        bad = sorted({ch for ch in text if ch not in self._ids})
        if bad:
            raise TextError(
                f"characters outside the vocabulary (a-z, space, apostrophe): {bad!r} in {text!r}"
            )
        return [self._ids[ch] for ch in text]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``, blanks skipped (no CTC repeat-collapsing: that belongs to the decoder).

        Raises:
            TextError: an id is outside ``[0, vocab_size)``.
        """
        chars: list[str] = []
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise TextError(f"token id {i} outside the vocabulary [0, {self.vocab_size})")
            if i != self.blank:
                chars.append(self.vocab[i])
        return "".join(chars)
