"""Featurised examples, the on-disk feature cache and batching.

A recognizer (``fl/model``) decides what its features are (normalised log-mel frames for the
Conformer; a frozen Whisper encoder's outputs). They are computed once per utterance and stored as
float16 next to the corpus cache, so that every device round and every evaluation reuse them instead
of decoding audio (and running a frozen encoder) again.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
import torch
import torchaudio

from fl.data.audio import TARGET_SR, AudioError, load_audio
from fl.data.readers import Problem
from fl.data.records import Utterance

if TYPE_CHECKING:
    from fl.model import Recognizer

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
    feats: torch.Tensor  # [frames, ...] float16: the recognizer's features
    tokens: torch.Tensor  # [L] int64 (empty without a transcript)
    text: Optional[str]  # None: no transcript (an unlabelled recording, train.labels=pseudo|corrections)
    seconds: float = 0.0  # the audio's length


@dataclass
class FeatureSet:
    examples: list[Example]
    problems: list[Problem]


def _cache_key(utterances: Sequence[Utterance], feature_key: str, max_seconds: float) -> str:
    h = hashlib.sha256(f"features-v2:{feature_key}:{max_seconds!r}".encode())
    for u in utterances:
        h.update(f"{u.id}\t{u.audio}\t{'' if u.text is None else u.text}\n".encode())  # '': no transcript
    return h.hexdigest()[:16]


def featurize(
    utterances: Sequence[Utterance],
    recognizer: "Recognizer",
    cache_dir: Path,
    max_seconds: float = 30.0,
    chunk: int = 16,
) -> FeatureSet:
    """Featurise ``utterances`` for ``recognizer``, skipping (and reporting) any whose audio or text is bad
    (a recording without a transcript is kept, with no tokens).

    Audio longer than ``max_seconds`` or than the model takes is skipped. Results are cached in
    ``cache_dir`` under a key of the utterance list, the recognizer's feature settings and the length
    limit (which decides what is skipped). ``chunk`` utterances are featurised together.
    """
    limit = min(max_seconds, recognizer.max_seconds)
    cache = Path(cache_dir) / f"feats-{_cache_key(utterances, recognizer.feature_key, limit)}.pt"
    if cache.exists():
        blob = torch.load(cache, weights_only=False)
        return FeatureSet(blob["examples"], blob["problems"])
    log.info("featurising %d utterances (%s) -> %s", len(utterances), recognizer.feature_key, cache)
    examples: list[Example] = []
    problems: list[Problem] = []
    pending: list[tuple[Utterance, torch.Tensor, np.ndarray]] = []

    def flush() -> None:
        for (u, tokens, audio), feats in zip(pending, recognizer.features([a for _, _, a in pending])):
            examples.append(Example(u.id, u.speaker, feats.to(torch.float16), tokens, u.text, len(audio) / TARGET_SR))
        pending.clear()

    for u in utterances:
        try:
            tokens = torch.tensor([] if u.text is None else recognizer.encode(u.text), dtype=torch.long)
            if u.text is not None and tokens.numel() == 0:
                raise ValueError("empty transcript")
            pending.append((u, tokens, load_audio(u.audio, max_seconds=limit)))
        except (AudioError, ValueError) as err:
            problems.append(Problem(u.id, str(err)))
            continue
        if len(pending) == chunk:
            flush()
    flush()
    for p in problems:
        log.warning("skipped %s: %s", p.utterance_id, p.reason)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    torch.save({"examples": examples, "problems": problems}, tmp)
    tmp.replace(cache)
    log.info("featurised %d utterances (%d skipped)", len(examples), len(problems))
    return FeatureSet(examples, problems)


@dataclass(frozen=True)
class Batch:
    feats: torch.Tensor  # [B, T, ...] float32, zero-padded
    feat_lens: torch.Tensor  # [B]
    targets: torch.Tensor  # [B, L] int64, zero-padded
    target_lens: torch.Tensor  # [B]
    seconds: torch.Tensor  # [B] float: each example's audio length

    def to(self, device: torch.device) -> "Batch":
        """This batch on ``device`` (the same tensors where they are there already)."""
        return Batch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def collate(examples: Sequence[Example]) -> Batch:
    """Pad a non-empty list of examples into one batch."""
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    b = len(examples)
    t = max(e.feats.shape[0] for e in examples)
    lmax = max(e.tokens.numel() for e in examples)
    feats = torch.zeros(b, t, *examples[0].feats.shape[1:])
    targets = torch.zeros(b, lmax, dtype=torch.long)
    for i, e in enumerate(examples):
        feats[i, : e.feats.shape[0]] = e.feats.float()
        targets[i, : e.tokens.numel()] = e.tokens
    return Batch(
        feats,
        torch.tensor([e.feats.shape[0] for e in examples], dtype=torch.long),
        targets,
        torch.tensor([e.tokens.numel() for e in examples], dtype=torch.long),
        torch.tensor([e.seconds for e in examples], dtype=torch.float32),
    )
