"""Greedy CTC decoding and word/character error rates (corpus-level, via jiwer)."""

from __future__ import annotations

from typing import Sequence

import jiwer
import torch

from fl.data.text import CharTokenizer


def greedy_decode(log_probs: torch.Tensor, lengths: torch.Tensor, tokenizer: CharTokenizer) -> list[str]:
    """Best path: argmax per frame, merge repeats, drop blanks."""
    best = log_probs.argmax(dim=-1)
    texts = []
    for row, n in zip(best, lengths.tolist()):
        ids = torch.unique_consecutive(row[:n]).tolist()
        texts.append(" ".join(tokenizer.decode([i for i in ids if i != tokenizer.blank]).split()))
    return texts


def error_rates(references: Sequence[str], hypotheses: Sequence[str]) -> tuple[float, float]:
    """Corpus WER and CER: total edits over total reference words (characters)."""
    if not references:
        raise ValueError("error_rates needs at least one reference")
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    wer = jiwer.wer(list(references), list(hypotheses))
    cer = jiwer.cer(list(references), list(hypotheses))
    return float(wer), float(cer)
