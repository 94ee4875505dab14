"""load_audio: every supported format and rate comes back as 16 kHz mono; every bad file is named."""

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from fl.data.audio import TARGET_SR, AudioError, load_audio


def tone(sr: int, seconds: float, channels: int = 1, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    x = (amp * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


@pytest.mark.parametrize(
    "name, sr, channels, fmt, subtype",
    [
        ("a.wav", 16000, 1, "WAV", "PCM_16"),
        ("b.wav", 8000, 1, "WAV", "PCM_16"),
        ("c.flac", 22050, 1, "FLAC", "PCM_16"),
        ("d.wav", 44100, 2, "WAV", "FLOAT"),
        ("e.ogg", 44100, 1, "OGG", "VORBIS"),
        ("f.ogg", 16000, 2, "OGG", "OPUS"),
    ],
)
def test_loads_as_16k_mono(tmp_path: Path, name, sr, channels, fmt, subtype) -> None:
    path = tmp_path / name
    sf.write(path, tone(sr, 1.0, channels), sr, format=fmt, subtype=subtype)
    x = load_audio(path)
    assert x.dtype == np.float32 and x.ndim == 1
    assert abs(len(x) - TARGET_SR) <= 2  # one second
    assert 0.3 < np.abs(x).max() < 0.7  # the tone survives resampling and lossy codecs


def test_stereo_is_averaged(tmp_path: Path) -> None:
    left = tone(TARGET_SR, 0.5)
    stereo = np.stack([left, np.zeros_like(left)], axis=1)
    sf.write(tmp_path / "s.wav", stereo, TARGET_SR, subtype="FLOAT")
    np.testing.assert_allclose(load_audio(tmp_path / "s.wav"), left / 2, atol=1e-6)


def test_length_limit_can_be_raised_or_disabled(tmp_path: Path) -> None:
    sf.write(tmp_path / "long.wav", tone(8000, 3.0), 8000)
    with pytest.raises(AudioError, match="too long"):
        load_audio(tmp_path / "long.wav", max_seconds=2.0)
    assert len(load_audio(tmp_path / "long.wav", max_seconds=None)) == 3 * TARGET_SR


def write_header_only(path: Path) -> None:
    sf.write(path, np.zeros((0,), np.float32), TARGET_SR, subtype="PCM_16")


def write_nan(path: Path) -> None:
    x = tone(TARGET_SR, 0.5)
    x[100] = np.nan
    sf.write(path, x, TARGET_SR, subtype="FLOAT")


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda p: None, "file not found"),
        (lambda p: p.write_bytes(b""), "empty"),
        (lambda p: p.write_bytes(b"this is not audio at all" * 40), "unreadable or corrupt"),
        (lambda p: p.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt garbage"), "unreadable or corrupt"),
        (write_header_only, "no audio samples"),
        (write_nan, "NaN or Inf"),
        (lambda p: sf.write(p, np.zeros(8000, np.float32), TARGET_SR), "silent"),
        (lambda p: sf.write(p, tone(TARGET_SR, 31.0), TARGET_SR), "too long"),
    ],
    ids=["missing", "zero-bytes", "corrupt", "bad-header", "header-only", "nan", "silent", "long"],
)
def test_bad_files_raise_with_reason(tmp_path: Path, make, reason: str) -> None:
    path = tmp_path / "bad.wav"
    make(path)
    with pytest.raises(AudioError, match=reason) as info:
        load_audio(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)
