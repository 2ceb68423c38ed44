"""Tokenizing a batch's phrases for inference: each distinct phrase once.

A phrase that several samples of a batch share (one searched phrase over every image, or the
same expression on several images) is tokenized and encoded once; ``order`` maps each
sample's phrase to its row, so the model repeats its text features instead.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch

from ..data.text import PhraseTokenizer
from ..models.build import build_tokenizer
from ..models.config import GrounderConfig


def phrase_tokenizer(config: GrounderConfig) -> PhraseTokenizer:
    """The tokenizer of a model's text encoder, cutting phrases to its ``max_text_len``."""
    return PhraseTokenizer(build_tokenizer(config), config.max_text_len)


class DistinctPhrases(NamedTuple):
    input_ids: torch.Tensor  # (U, T) the distinct phrases, in the order first seen
    attention_mask: torch.Tensor  # (U, T)
    order: Optional[torch.Tensor]  # (B,) each phrase's row; None where every phrase is distinct


def tokenize_distinct(tokenize: PhraseTokenizer, phrases: Sequence[str]) -> DistinctPhrases:
    """The tokens of each distinct phrase of ``phrases`` once, and where each phrase is among them."""
    unique = list(dict.fromkeys(phrases))
    tokens = tokenize(unique)
    order = None
    if len(unique) < len(phrases):
        position = {phrase: i for i, phrase in enumerate(unique)}
        order = torch.tensor([position[p] for p in phrases], dtype=torch.long)  # (B,)
    return DistinctPhrases(tokens["input_ids"], tokens["attention_mask"], order)
