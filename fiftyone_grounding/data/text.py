"""Phrases: cleaning, tokenizing, and the left/right swap that goes with a horizontal flip."""

from __future__ import annotations

import logging
import re
from typing import Optional, Sequence

logger = logging.getLogger(__name__)

NO_PHRASE = "missing or empty phrase"  # why a sample without a usable phrase is skipped

# Whole words only: "bright" and "leftover" stay as they are (TransVG's str.replace
# turned "bright" into "bleft").
_LEFT_RIGHT = re.compile(r"\b(left|right)(most)?\b", re.IGNORECASE)
_SWAP = {"left": "right", "right": "left"}


def clean_phrase(phrase) -> Optional[str]:
    """Whitespace-normalized phrase, or None when missing or empty."""
    if not isinstance(phrase, str):
        return None
    phrase = " ".join(phrase.split())
    return phrase or None


def swap_left_right(phrase: str) -> str:
    """Swap the whole words left/right (and leftmost/rightmost), keeping their case."""

    def repl(m: re.Match) -> str:
        word = m.group(1)
        new = _SWAP[word.lower()]
        if word.isupper():
            new = new.upper()
        elif word[0].isupper():
            new = new.capitalize()
        return new + (m.group(2) or "")

    return _LEFT_RIGHT.sub(repl, phrase)


class PhraseTokenizer:
    """Phrases -> padded token ids of at most ``max_len`` tokens.

    Longer phrases are cut to the encoder's limit; the first time that happens this
    instance logs one warning (one per training run or ``apply_model`` call, not per batch).
    """

    def __init__(self, tokenizer, max_len: int):
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.warned = False

    def __call__(self, phrases: Sequence[str]):
        tokens = self.tokenizer(list(phrases), padding=True, truncation=True, max_length=self.max_len,
                                return_tensors="pt")
        if not self.warned:
            # Fast tokenizers keep what truncation removed; slow ones cannot tell.
            cut = [p for p, enc in zip(phrases, tokens.encodings or []) if enc.overflowing]
            if cut:
                self.warned = True
                logger.warning(
                    "%d phrase(s) are longer than the text encoder's limit of %d tokens and were cut to "
                    "it, e.g. %r. Shorten them to use all of the text (this warning is shown once per run).",
                    len(cut), self.max_len, cut[0][:80] + ("..." if len(cut[0]) > 80 else ""))
        return tokens
