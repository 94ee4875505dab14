"""Word and character error rates, raw and after Whisper's English normaliser (corpus-level, via jiwer).

The normalised WER is the headline: both reference and hypothesis go through OpenAI Whisper's
English text normaliser (the ``whisper-normalizer`` package, MIT): case, punctuation, spelling
variants, and number words vs numerals both ways ("two nine nine two" and "2992" score equal). The
raw WER only lowercases and strips punctuation (``normalize_transcript``), so a model is not credited
or blamed twice for a style it was never taught.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import jiwer
from whisper_normalizer.english import EnglishTextNormalizer

from fl.data.text import normalize_transcript


@lru_cache(maxsize=1)
def _english() -> EnglishTextNormalizer:
    return EnglishTextNormalizer()


def english_normalize(text: str) -> str:
    """Whisper's English normalisation of ``text`` (may be empty, e.g. for a filler word)."""
    return _english()(text)


@dataclass(frozen=True)
class Scores:
    wer: float  # normalised (the headline)
    cer: float  # normalised
    raw_wer: float


def _rate(measure, refs: list[str], hyps: list[str]) -> float:
    kept = [(r, h) for r, h in zip(refs, hyps) if r.strip()]  # a reference emptied by normalising scores nothing
    if not kept:
        return 0.0
    return float(measure([r for r, _ in kept], [h for _, h in kept]))


def scores(references: Sequence[str], hypotheses: Sequence[str]) -> Scores:
    """Corpus WER/CER (total edits over total reference words/characters), normalised and raw."""
    if not references:
        raise ValueError("scoring needs at least one reference")
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    refs = [english_normalize(r) for r in references]
    hyps = [english_normalize(h) for h in hypotheses]
    raw_refs = [normalize_transcript(r) for r in references]
    raw_hyps = [normalize_transcript(h) for h in hypotheses]
    return Scores(_rate(jiwer.wer, refs, hyps), _rate(jiwer.cer, refs, hyps), _rate(jiwer.wer, raw_refs, raw_hyps))
