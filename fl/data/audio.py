"""Loading one recording as the model sees it: float32 mono samples at 16 kHz.

Every check that can be made from the header (missing, empty, unreadable, too long) is made before
decoding; the samples are decoded once and then checked for NaN/Inf and silence. Any failure raises
:class:`AudioError` naming the file and the reason, so a caller can skip the recording and go on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

TARGET_SR = 16000
"""Sample rate, in Hz, of every array :func:`load_audio` returns."""

DEFAULT_MAX_SECONDS = 30.0
"""Recordings longer than this are rejected unless the caller allows more."""

SILENCE_PEAK = 1e-4
"""A recording whose absolute peak (full scale = 1.0) is below this is treated as silent."""


class AudioError(ValueError):
    """A recording that cannot be used: the message names the file and what is wrong with it."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def load_audio(path: str | Path, max_seconds: float | None = DEFAULT_MAX_SECONDS) -> np.ndarray:
    """Read ``path`` (WAV, FLAC, Ogg Vorbis/Opus: anything libsndfile reads) as 16 kHz mono float32.

    Stereo and multi-channel audio is averaged to mono; other sample rates are resampled to
    :data:`TARGET_SR`. ``max_seconds=None`` disables the length limit.

    Raises:
        AudioError: the file is missing, empty, unreadable or corrupt, has no samples, holds
            NaN/Inf samples, is silent (peak below :data:`SILENCE_PEAK`), or is longer than
            ``max_seconds``.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioError(path, "file not found")
    if path.stat().st_size == 0:
        raise AudioError(path, "file is empty (0 bytes)")
    try:
        with sf.SoundFile(path) as f:
            sr, frames = f.samplerate, f.frames
            if frames == 0:
                raise AudioError(path, "no audio samples (header only)")
            if max_seconds is not None and frames / sr > max_seconds:
                raise AudioError(path, f"too long: {frames / sr:.1f} s > max {max_seconds:g} s")
            data = f.read(dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, EOFError) as e:
        raise AudioError(path, f"unreadable or corrupt audio ({e})") from e
    if data.shape[0] == 0:
        raise AudioError(path, "no audio samples (header only or truncated)")
    mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    if not np.isfinite(mono).all():
        raise AudioError(path, "contains NaN or Inf samples")
    peak = float(np.abs(mono).max())
    if peak < SILENCE_PEAK:
        raise AudioError(path, f"silent (peak amplitude {peak:.2e} < {SILENCE_PEAK:g})")
    if sr != TARGET_SR:
        mono = AF.resample(torch.from_numpy(np.ascontiguousarray(mono)), sr, TARGET_SR).numpy()
    return np.ascontiguousarray(mono, dtype=np.float32)
