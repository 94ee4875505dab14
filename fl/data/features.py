"""Log-mel features and the on-disk feature cache.

Features are computed once per utterance and stored as float16 next to the corpus cache, so that
pretraining, every device round and every evaluation reuse them instead of decoding audio again.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torchaudio

from fl.data.audio import TARGET_SR, AudioError, load_audio
from fl.data.readers import Problem
from fl.data.records import Utterance
from fl.data.text import CharTokenizer

log = logging.getLogger(__name__)

HOP_LENGTH = 160  # 10 ms at 16 kHz
WIN_LENGTH = 400  # 25 ms


class LogMel:
    """Waveform (16 kHz mono) -> per-utterance normalised log-mel frames ``[T, n_mels]``."""

    def __init__(self, n_mels: int = 64) -> None:
        self.n_mels = n_mels
        self._mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=TARGET_SR,
            n_fft=WIN_LENGTH,
            win_length=WIN_LENGTH,
            hop_length=HOP_LENGTH,
            n_mels=n_mels,
        )

    def __call__(self, audio: np.ndarray) -> torch.Tensor:
        wave = torch.as_tensor(audio, dtype=torch.float32)
        with torch.no_grad():
            mel = self._mel(wave).clamp_min(1e-10).log().T  # [T, n_mels]
        mean = mel.mean(dim=0, keepdim=True)
        std = mel.std(dim=0, keepdim=True).clamp_min(1e-5)
        return (mel - mean) / std


@dataclass(frozen=True)
class Example:
    """One featurised utterance: what training and evaluation consume."""

    id: str
    speaker: str
    feats: torch.Tensor  # [T, n_mels] float16
    tokens: torch.Tensor  # [L] int64
    text: str


@dataclass
class FeatureSet:
    examples: list[Example]
    problems: list[Problem]


def _cache_key(utterances: Sequence[Utterance], n_mels: int, max_seconds: float) -> str:
    h = hashlib.sha256(f"logmel-v1:{n_mels}:{HOP_LENGTH}:{WIN_LENGTH}:{max_seconds!r}".encode())
    for u in utterances:
        h.update(f"{u.id}\t{u.audio}\t{u.text}\n".encode())
    return h.hexdigest()[:16]


def featurize(
    utterances: Sequence[Utterance],
    tokenizer: CharTokenizer,
    n_mels: int,
    cache_dir: Path,
    max_seconds: float = 30.0,
) -> FeatureSet:
    """Featurise ``utterances``, skipping (and reporting) any whose audio or text is bad.

    Results are cached in ``cache_dir`` under a key of the utterance list, the feature settings and
    ``max_seconds`` (which decides what is skipped).
    """
    cache = Path(cache_dir) / f"feats-{_cache_key(utterances, n_mels, max_seconds)}.pt"
    if cache.exists():
        blob = torch.load(cache, weights_only=False)
        return FeatureSet(blob["examples"], blob["problems"])
    extractor = LogMel(n_mels)
    examples: list[Example] = []
    problems: list[Problem] = []
    for u in utterances:
        try:
            tokens = torch.tensor(tokenizer.encode(u.text), dtype=torch.long)
            if tokens.numel() == 0:
                raise ValueError("empty transcript")
            feats = extractor(load_audio(u.audio, max_seconds=max_seconds))
        except (AudioError, ValueError) as err:
            problems.append(Problem(u.id, str(err)))
            continue
        examples.append(Example(u.id, u.speaker, feats.to(torch.float16), tokens, u.text))
    for p in problems:
        log.warning("skipped %s: %s", p.utterance_id, p.reason)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    torch.save({"examples": examples, "problems": problems}, tmp)
    tmp.replace(cache)
    log.info("featurised %d utterances (%d skipped) -> %s", len(examples), len(problems), cache)
    return FeatureSet(examples, problems)


@dataclass(frozen=True)
class Batch:
    feats: torch.Tensor  # [B, T, F] float32, zero-padded
    feat_lens: torch.Tensor  # [B]
    targets: torch.Tensor  # [B, L] int64, zero-padded
    target_lens: torch.Tensor  # [B]


def collate(examples: Sequence[Example], n_mels: int) -> Batch:
    """Pad a list of examples into one batch (an empty list gives an empty batch)."""
    b = len(examples)
    t = max((e.feats.shape[0] for e in examples), default=1)
    lmax = max((e.tokens.numel() for e in examples), default=1)
    feats = torch.zeros(b, t, n_mels)
    targets = torch.zeros(b, lmax, dtype=torch.long)
    for i, e in enumerate(examples):
        feats[i, : e.feats.shape[0]] = e.feats.float()
        targets[i, : e.tokens.numel()] = e.tokens
    return Batch(
        feats,
        torch.tensor([e.feats.shape[0] for e in examples], dtype=torch.long),
        targets,
        torch.tensor([e.tokens.numel() for e in examples], dtype=torch.long),
    )
