"""The embedded synthetic corpus: eSpeak binding, sentences, speakers, conditions and the cache."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from fl.data import embedded, espeak
from fl.data.embedded import (
    SAMPLE_RATE,
    Condition,
    build_embedded_corpus,
    make_speakers,
    resample_to_16k,
)
from fl.data.espeak import ESPEAK_RATE, available_languages, available_variants, synthesize
from fl.data.sentences import generate_sentences, normalize_transcript, number_words, vocabulary

TINY = dict(n_public=2, n_private=2, public_utterances=3, private_utterances=3, shift=0.8)
TRANSCRIPT = re.compile(r"^[a-z']+( [a-z']+)*$")


def _relative(corpus: embedded.EmbeddedCorpus) -> list[tuple]:
    """Manifest rows with audio paths relative to the corpus folder, so two roots compare equal."""
    return [
        (u.id, Path(u.audio).relative_to(corpus.root).as_posix(), u.text, u.speaker, u.duration)
        for u in corpus.public + corpus.private
    ]


def _audio_bytes(corpus: embedded.EmbeddedCorpus) -> list[bytes]:
    return [Path(u.audio).read_bytes() for u in corpus.public + corpus.private]


def test_synthesis_is_speech_of_plausible_length() -> None:
    audio = synthesize("set a timer for five minutes", "en-us+m3", pitch=50, rate=160)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert 1.0 < len(audio) / ESPEAK_RATE < 3.5
    assert np.sqrt(np.mean(audio**2)) > 0.02
    assert np.abs(audio).max() <= 1.0


def test_synthesis_depends_only_on_its_arguments() -> None:
    first = synthesize("turn off the kitchen lights", "en-gb-scotland+klatt", pitch=30, rate=140, seed=3)
    synthesize("call mom", "en+f2", pitch=70, rate=180)  # would perturb state a shared instance keeps
    again = synthesize("turn off the kitchen lights", "en-gb-scotland+klatt", pitch=30, rate=140, seed=3)
    np.testing.assert_array_equal(first, again)
    slower = synthesize("turn off the kitchen lights", "en-gb-scotland+klatt", pitch=30, rate=100, seed=3)
    assert len(slower) > len(first) * 1.15


def test_every_voice_the_speakers_use_exists() -> None:
    languages, variants = available_languages(), available_variants()
    assert {"en-us", "en", "en-gb-scotland"} <= languages and {"m3", "f2", "klatt"} <= variants
    assert set(embedded._PUBLIC_LANGUAGES + embedded._SHIFTED_LANGUAGES) <= languages
    assert set(embedded._PUBLIC_VARIANTS + embedded._SHIFTED_VARIANTS) - {""} <= variants


def test_an_unloadable_library_is_a_clear_runtime_error(tmp_path: Path) -> None:
    broken = tmp_path / "libespeak-ng.so"
    broken.write_bytes(b"not a shared library")
    with pytest.raises(RuntimeError, match="could not load the eSpeak NG library"):
        espeak._open(broken, tmp_path)


@pytest.mark.parametrize("voice", ["en-us+nosuchvariant", "xx-nosuchlanguage"])
def test_unknown_voices_are_refused(voice: str) -> None:
    with pytest.raises(ValueError, match="unknown eSpeak"):
        synthesize("hello", voice)


def test_sentences_are_normalised_short_commands() -> None:
    import random

    sentences = generate_sentences(500, random.Random(0))
    assert len(sentences) == 500 and len(set(sentences)) > 450
    assert all(TRANSCRIPT.match(s) for s in sentences)
    assert sum(3 <= len(s.split()) <= 8 for s in sentences) / len(sentences) > 0.8
    assert len(vocabulary()) >= 300
    assert not any(ch.isdigit() for s in sentences for ch in s)
    assert generate_sentences(20, random.Random(5)) == generate_sentences(20, random.Random(5))
    assert number_words(125) == "one hundred twenty five" and number_words(40) == "forty"
    assert normalize_transcript("  What's the  Weather, in PARIS?") == "what's the weather in paris"


@pytest.mark.parametrize("shift", [0.0, 0.5, 1.0])
def test_public_and_private_speakers_are_disjoint(shift: float) -> None:
    for seed in range(3):
        public, private = make_speakers(24, 8, seed, shift)
        assert len(public) == 24 and len(private) == 8
        ids = [s.id for s in public + private]
        assert len(set(ids)) == len(ids)
        assert all(s.id.startswith("pub-") for s in public) and all(s.id.startswith("dev-") for s in private)
        combos = [s.combination() for s in public + private]
        assert len(set(combos)) == len(combos)


def test_shift_moves_private_speakers_to_another_population() -> None:
    public, private = make_speakers(24, 16, seed=1, shift=1.0)
    public_languages = {s.voice.split("+")[0] for s in public}
    public_variants = {s.voice.partition("+")[2] for s in public}
    assert not public_languages & {s.voice.split("+")[0] for s in private}
    assert not public_variants & {s.voice.partition("+")[2] for s in private}
    assert all(not 35 <= s.pitch <= 65 for s in private)
    assert all(s.condition.noise_snr_db is not None and s.condition.noise_snr_db <= 22 for s in private)
    assert all(s.condition.noise_snr_db is None or s.condition.noise_snr_db >= 30 for s in public)
    assert all(s.condition.band_high_hz is None and s.condition.echo_gain == 0 for s in public)
    # the public speakers do not depend on the private ones or the shift
    assert make_speakers(24, 3, seed=1, shift=0.0)[0] == public


def test_band_limit_removes_energy_outside_the_band() -> None:
    rng = np.random.default_rng(0)
    audio = rng.normal(0, 0.1, SAMPLE_RATE * 2)
    out = Condition(band_low_hz=300.0, band_high_hz=3400.0).apply(audio, SAMPLE_RATE, rng)
    freqs = np.fft.rfftfreq(len(out), 1 / SAMPLE_RATE)
    before, after = np.abs(np.fft.rfft(audio)) ** 2, np.abs(np.fft.rfft(out)) ** 2
    outside = (freqs > 3400 + embedded._TAPER_HZ) | (freqs < 300 - embedded._TAPER_HZ)
    inside = (freqs > 400) & (freqs < 3300)
    assert after[outside].sum() < 1e-6 * before[outside].sum()
    assert after[inside].sum() == pytest.approx(before[inside].sum(), rel=0.01)


@pytest.mark.parametrize("snr", [10.0, 20.0])
def test_noise_is_added_at_the_requested_snr(snr: float) -> None:
    t = np.arange(SAMPLE_RATE * 2) / SAMPLE_RATE
    audio = 0.3 * np.sin(2 * np.pi * 440 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    out = Condition(noise_snr_db=snr).apply(audio, SAMPLE_RATE, np.random.default_rng(1))
    noise = out.astype(np.float64) - audio
    measured = 10 * np.log10(np.mean(audio**2) / np.mean(noise**2))
    assert abs(measured - snr) < 1.0


def test_gain_echo_and_clipping() -> None:
    audio = np.zeros(SAMPLE_RATE, dtype=np.float32)
    audio[100] = 0.5
    condition = Condition(gain_db=6.0206, echo_delay_ms=10.0, echo_gain=0.5)
    out = condition.apply(audio, SAMPLE_RATE, np.random.default_rng(0))
    assert out[100] == pytest.approx(1.0, abs=1e-4)
    assert out[100 + 160] == pytest.approx(0.5, abs=1e-4) and out[100 + 320] == pytest.approx(0.25, abs=1e-4)
    loud = Condition(gain_db=20.0).apply(audio, SAMPLE_RATE, np.random.default_rng(0))
    assert loud.max() == 1.0


def test_resampling_keeps_frequency_and_exact_length() -> None:
    t = np.arange(ESPEAK_RATE) / ESPEAK_RATE
    out = resample_to_16k(np.sin(2 * np.pi * 1000 * t).astype(np.float32))
    assert len(out) == SAMPLE_RATE
    assert np.argmax(np.abs(np.fft.rfft(out))) == 1000  # 1 Hz bins for a one-second clip


def test_same_seed_same_corpus_and_different_seed_different(tmp_path: Path) -> None:
    a = build_embedded_corpus(tmp_path / "a", seed=7, workers=1, **TINY)
    b = build_embedded_corpus(tmp_path / "b", seed=7, workers=2, **TINY)
    c = build_embedded_corpus(tmp_path / "c", seed=8, workers=1, **TINY)
    assert len(a.public) == 6 and len(a.private) == 6
    assert _relative(a) == _relative(b)
    assert _audio_bytes(a) == _audio_bytes(b)
    assert [u.text for u in a.public] != [u.text for u in c.public]
    assert not set(_audio_bytes(a)) & set(_audio_bytes(c))


def test_corpus_files_and_manifests(tmp_path: Path) -> None:
    corpus = build_embedded_corpus(tmp_path, seed=0, workers=1, **TINY)
    assert corpus.root.parent == tmp_path.resolve() and (corpus.root / "DONE").is_file()
    rows = corpus.public + corpus.private
    assert [u.id for u in corpus.public] == sorted(u.id for u in corpus.public)
    assert len({u.id for u in rows}) == len(rows)
    assert {u.speaker for u in corpus.public} == {"pub-000", "pub-001"}
    assert {u.speaker for u in corpus.private} == {"dev-000", "dev-001"}
    for u in rows:
        assert TRANSCRIPT.match(u.text)
        path = Path(u.audio)
        assert path.is_absolute() and path == corpus.root / "wav" / u.speaker / f"{u.id}.wav"
        info = sf.info(str(path))
        assert info.samplerate == SAMPLE_RATE and info.channels == 1 and info.subtype == "PCM_16"
        assert info.frames / SAMPLE_RATE == pytest.approx(u.duration)
        audio, _ = sf.read(str(path))
        assert 0.5 < u.duration < 6.0 and np.sqrt(np.mean(audio**2)) > 0.005


def test_cache_is_reused_and_keyed_by_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = build_embedded_corpus(tmp_path, seed=0, workers=1, **TINY)
    mtimes = {u.audio: Path(u.audio).stat().st_mtime_ns for u in first.public + first.private}

    def refuse(job: tuple) -> list:
        raise AssertionError("regenerated a cached corpus")

    monkeypatch.setattr(embedded, "_build_speaker", refuse)
    again = build_embedded_corpus(tmp_path, seed=0, workers=1, **TINY)
    assert again == first
    assert mtimes == {u.audio: Path(u.audio).stat().st_mtime_ns for u in again.public + again.private}
    with pytest.raises(AssertionError, match="regenerated"):
        build_embedded_corpus(tmp_path, seed=0, workers=1, **{**TINY, "shift": 0.3})


def test_interrupted_build_leaves_no_complete_looking_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = embedded._build_speaker
    calls = []

    def dies_on_second(job: tuple) -> list:
        calls.append(job[0].id)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(job)

    monkeypatch.setattr(embedded, "_build_speaker", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        build_embedded_corpus(tmp_path, seed=0, workers=1, **TINY)
    assert not list(tmp_path.rglob("DONE")) and not list(tmp_path.glob(".tmp-*"))
    killed = tmp_path / ".tmp-0123456789ab-999999999-x1"  # as a SIGKILLed build leaves it (no such pid)
    running = tmp_path / f".tmp-0123456789ab-{os.getpid()}-x2"  # a build still in progress
    killed.mkdir(), running.mkdir()
    monkeypatch.setattr(embedded, "_build_speaker", real)
    corpus = build_embedded_corpus(tmp_path, seed=0, workers=1, **TINY)
    assert len(corpus.public) == 6 and (corpus.root / "DONE").is_file()
    assert not killed.exists() and running.exists()
