"""The embedded, download-free corpus: synthetic speakers saying voice-assistant commands.

Every speaker is an eSpeak NG voice (language + variant) with a pitch, a speaking rate, an
intonation range and a recording :class:`Condition`. Public speakers (the server's pretraining
data) and private speakers (the devices) never share a combination, and ``shift`` in [0, 1] moves
the private population away from the public one: accented voices, other variants (including the
Klatt synthesiser), extreme pitch and rate, and harsher recordings (noise, telephone band, echo).
At ``shift=0`` both come from the same population.

:func:`build_embedded_corpus` writes 16 kHz 16-bit WAV files and JSONL manifests under
``root/<key>/``, where ``<key>`` hashes every parameter, and reuses that cache when it is complete.
All audio and text are a deterministic function of the parameters and the seed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import soundfile as sf

from fl.data.espeak import ESPEAK_RATE, espeak_version, synthesize
from fl.data.records import Utterance, write_manifest
from fl.data.sentences import generate_sentences

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
"""Sample rate (Hz) of the corpus' WAV files."""

CORPUS_VERSION = 1
"""Part of the cache key: bump it whenever generation changes, so old caches are not reused."""

_TAPER_HZ = 100.0  # width of the raised-cosine edge of a band limit
_PEAK = 0.5  # speech is peak-normalised to -6 dBFS before the recording condition is applied
_DONE = "DONE"

# Public population: General American and British voices, eSpeak's standard variants.
_PUBLIC_LANGUAGES = ("en-us", "en")
_PUBLIC_VARIANTS = ("", "m1", "m2", "m3", "m4", "f1", "f2", "f3")
# Shifted population: regional accents, other variants and the Klatt formant synthesiser.
_SHIFTED_LANGUAGES = ("en-gb-scotland", "en-029", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-us-nyc")
_SHIFTED_VARIANTS = ("m5", "m6", "m7", "m8", "f4", "f5", "klatt", "klatt2", "klatt3", "klatt4")
_TELEPHONE = (300.0, 3400.0)


@dataclass(frozen=True)
class Condition:
    """How a speaker's recordings were made; :meth:`apply` turns clean speech into such a recording.

    ``noise_snr_db`` is the signal-to-noise ratio of added white Gaussian noise, relative to the
    mean power of the whole input clip (``None``: no noise). ``band_low_hz``/``band_high_hz`` keep
    only that band (``None``: no limit on that side; 300-3400 Hz is a telephone line). An echo
    adds three reflections ``echo_delay_ms`` apart, each ``echo_gain`` times the previous one.
    """

    gain_db: float = 0.0
    noise_snr_db: float | None = None
    band_low_hz: float | None = None
    band_high_hz: float | None = None
    echo_delay_ms: float = 0.0
    echo_gain: float = 0.0

    def apply(self, audio: np.ndarray, sr: int, rng: np.random.Generator) -> np.ndarray:
        """Room echo, then background noise, then the channel's band limit, then gain; clip to [-1, 1]."""
        out = np.asarray(audio, dtype=np.float64).copy()
        delay = int(round(self.echo_delay_ms * sr / 1000.0))
        if delay > 0 and self.echo_gain > 0:
            clean = out.copy()
            for k in range(1, 4):
                if k * delay < len(out):
                    out[k * delay :] += self.echo_gain**k * clean[: len(out) - k * delay]
        if self.noise_snr_db is not None:
            power = float(np.mean(out**2)) if len(out) else 0.0
            if power > 0:
                noise_power = power / 10.0 ** (self.noise_snr_db / 10.0)
                out += rng.normal(0.0, np.sqrt(noise_power), size=len(out))
        if self.band_low_hz is not None or self.band_high_hz is not None:
            out = _band_limit(out, sr, self.band_low_hz, self.band_high_hz)
        out *= 10.0 ** (self.gain_db / 20.0)
        return np.clip(out, -1.0, 1.0).astype(np.float32)


def _band_limit(x: np.ndarray, sr: int, low: float | None, high: float | None) -> np.ndarray:
    """Keep [low, high] Hz with an FFT mask whose edges fall to zero over :data:`_TAPER_HZ`."""
    freqs = np.fft.rfftfreq(len(x), d=1.0 / sr)
    mask = np.ones_like(freqs)
    if high is not None:
        mask *= np.clip((high + _TAPER_HZ - freqs) / _TAPER_HZ, 0.0, 1.0)
    if low is not None:
        mask *= np.clip((freqs - (low - _TAPER_HZ)) / _TAPER_HZ, 0.0, 1.0)
    mask = 0.5 - 0.5 * np.cos(np.pi * mask)  # raised-cosine edges
    return np.fft.irfft(np.fft.rfft(x) * mask, n=len(x))


@dataclass(frozen=True)
class SpeakerProfile:
    """One synthetic speaker: ``voice`` is an eSpeak name (``en-us+m3``), ``pitch`` and
    ``pitch_range`` are 0-99, ``rate`` is words per minute."""

    id: str
    voice: str
    pitch: int
    rate: int
    pitch_range: int
    condition: Condition

    def combination(self) -> tuple:
        """What makes two speakers the same speaker (everything but the id)."""
        return (self.voice, self.pitch, self.rate, self.pitch_range, self.condition)


def _either(
    rng: random.Random, shifted: bool, usual: tuple[int, int], extremes: tuple[tuple[int, int], ...]
) -> int:
    """An integer from the ``usual`` range, or (when ``shifted``) from one of the ``extremes``."""
    lo, hi = rng.choice(extremes) if shifted else usual
    return rng.randint(lo, hi)


def _draw_speaker(speaker_id: str, rng: random.Random, shift: float) -> SpeakerProfile:
    """Draw a speaker; each attribute comes from the shifted population with probability ``shift``."""
    language = rng.choice(_SHIFTED_LANGUAGES if rng.random() < shift else _PUBLIC_LANGUAGES)
    variant = rng.choice(_SHIFTED_VARIANTS if rng.random() < shift else _PUBLIC_VARIANTS)
    pitch = _either(rng, rng.random() < shift, (35, 65), ((10, 30), (70, 90)))
    rate = _either(rng, rng.random() < shift, (150, 175), ((130, 145), (180, 190)))
    pitch_range = _either(rng, rng.random() < shift, (40, 60), ((15, 35), (65, 85)))
    noisy = rng.random() < 0.5 + 0.5 * shift
    band = None, None
    if rng.random() < 0.5 * shift:
        band = _TELEPHONE
    elif rng.random() < 0.3 * shift:
        band = None, float(rng.randrange(4000, 6001, 250))  # a cheap microphone
    echo = rng.random() < 0.5 * shift
    condition = Condition(
        gain_db=round(rng.uniform(-6.0 - 6.0 * shift, 3.0 * shift), 1),
        noise_snr_db=round(rng.uniform(30.0 - 18.0 * shift, 40.0 - 18.0 * shift), 1) if noisy else None,
        band_low_hz=band[0],
        band_high_hz=band[1],
        echo_delay_ms=float(rng.randint(20, 60)) if echo else 0.0,
        echo_gain=round(rng.uniform(0.2, 0.45), 2) if echo else 0.0,
    )
    voice = language + (f"+{variant}" if variant else "")
    return SpeakerProfile(speaker_id, voice, pitch, rate, pitch_range, condition)


def make_speakers(
    n_public: int, n_private: int, seed: int, shift: float
) -> tuple[list[SpeakerProfile], list[SpeakerProfile]]:
    """Public speakers ``pub-000``... and private (device) speakers ``dev-000``..., all distinct.

    Public speakers do not depend on ``n_private`` or ``shift``, and the first k of them are the
    same for any ``n_public >= k`` (likewise for private speakers, given ``shift``).
    """
    if not 0.0 <= shift <= 1.0:
        raise ValueError(f"shift must be in [0, 1], got {shift}")
    if n_public < 0 or n_private < 0:
        raise ValueError(f"speaker counts must be >= 0, got {n_public} and {n_private}")
    used: set[tuple] = set()
    groups: list[list[SpeakerProfile]] = []
    for prefix, count, group_shift in (("pub", n_public, 0.0), ("dev", n_private, shift)):
        rng = random.Random(f"unheard-speakers:{prefix}:{seed}")
        group: list[SpeakerProfile] = []
        for i in range(count):
            for _ in range(1000):
                speaker = _draw_speaker(f"{prefix}-{i:03d}", rng, group_shift)
                if speaker.combination() not in used:
                    break
            else:
                raise RuntimeError(f"could not draw a distinct speaker {prefix}-{i:03d}")
            used.add(speaker.combination())
            group.append(speaker)
        groups.append(group)
    return groups[0], groups[1]


@dataclass
class EmbeddedCorpus:
    """The built corpus: public (server) and private (device) utterances, and the folder they are in."""

    public: list[Utterance]
    private: list[Utterance]
    root: Path


def _derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any printable parts (Python's ``hash`` is salted per process)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def resample_to_16k(audio: np.ndarray) -> np.ndarray:
    """Resample eSpeak's 22,050 Hz audio to :data:`SAMPLE_RATE` exactly (320/441), by FFT.

    The clip is zero-padded to a multiple of 441 samples, so the output has exactly 320/441 as many;
    the FFT band limit is ideal, and the zero padding keeps wrap-around at the edges negligible.
    """
    up, down = SAMPLE_RATE // 50, ESPEAK_RATE // 50
    n = -(-len(audio) // down) * down
    m = n // down * up
    if n == 0:
        return np.zeros(0, np.float32)
    spectrum = np.fft.rfft(np.pad(audio.astype(np.float64), (0, n - len(audio))))[: m // 2 + 1]
    return (np.fft.irfft(spectrum, n=m) * (m / n)).astype(np.float32)


def render(text: str, speaker: SpeakerProfile, rng: np.random.Generator) -> np.ndarray:
    """Synthesize, trim, resample to 16 kHz, normalise, pad with silence, record under the condition."""
    seed = int(rng.integers(0, 2**31))
    audio = synthesize(text, speaker.voice, speaker.pitch, speaker.rate, speaker.pitch_range, seed=seed)
    voiced = np.flatnonzero(np.abs(audio) > 0.01 * max(float(np.abs(audio).max()), 1e-9))
    if len(voiced):
        audio = audio[voiced[0] : voiced[-1] + 1]
    audio = resample_to_16k(audio)
    peak = float(np.abs(audio).max()) if len(audio) else 0.0
    if peak > 0:
        audio = audio * (_PEAK / peak)
    lead, trail = (int(rng.uniform(0.1, 0.3) * SAMPLE_RATE) for _ in range(2))
    audio = np.concatenate([np.zeros(lead, np.float32), audio, np.zeros(trail, np.float32)])
    return speaker.condition.apply(audio, SAMPLE_RATE, rng)


def _build_speaker(job: tuple[SpeakerProfile, int, int, Path, Path]) -> list[Utterance]:
    """Write one speaker's ``n`` WAV files under ``work``; the records point at ``final``, where
    they will end up. Each utterance depends only on (seed, speaker, index), so any process may
    build any speaker."""
    speaker, n, seed, work, final = job
    texts = generate_sentences(n, random.Random(f"unheard-text:{seed}:{speaker.id}"))
    (work / "wav" / speaker.id).mkdir(parents=True, exist_ok=True)
    out = []
    for i, text in enumerate(texts):
        uid = f"{speaker.id}-{i:04d}"
        rng = np.random.default_rng(_derive_seed("unheard-audio", seed, speaker.id, i))
        audio = render(text, speaker, rng)
        rel = Path("wav") / speaker.id / f"{uid}.wav"
        sf.write(work / rel, audio, SAMPLE_RATE, subtype="PCM_16")
        out.append(Utterance(uid, str(final / rel), text, speaker.id, len(audio) / SAMPLE_RATE))
    return out


def _run_jobs(jobs: list[tuple], workers: int) -> Iterator[list[Utterance]]:
    """Each job's utterances, in completion order; in-process when one worker (or job) suffices."""
    if workers <= 1 or len(jobs) <= 1:
        yield from map(_build_speaker, jobs)
        return
    # fork on Linux: workers need no re-import of the caller's __main__ (which hangs a Pool when a
    # script lacks an ``if __name__ == "__main__"`` guard), and they only run numpy, soundfile and
    # eSpeak, never the parent's thread pools (torch, Ray) that make forking risky.
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with context.Pool(min(workers, len(jobs))) as pool:
        yield from pool.imap_unordered(_build_speaker, jobs)


def _read_manifest(path: Path) -> list[Utterance]:
    with path.open(encoding="utf-8") as f:
        return [Utterance.from_dict(json.loads(line)) for line in f if line.strip()]


def _load(final: Path) -> EmbeddedCorpus | None:
    """The complete cache at ``final``, or None when it is absent, unfinished or missing audio."""
    if not (final / _DONE).is_file():
        return None
    public, private = _read_manifest(final / "public.jsonl"), _read_manifest(final / "private.jsonl")
    corpus = EmbeddedCorpus(public, private, final)
    missing = [u.audio for u in corpus.public + corpus.private if not Path(u.audio).is_file()]
    if missing:
        log.warning("embedded corpus cache %s lacks %d audio files (e.g. %s); rebuilding",
                    final, len(missing), missing[0])  # fmt: skip
        return None
    return corpus


def _remove_stale_work_dirs(root: Path) -> None:
    """Delete work folders left by builds whose process no longer runs (killed, or the machine died)."""
    for work in root.glob(".tmp-*-*-*"):  # .tmp-<key>-<pid>-<random>
        try:
            os.kill(int(work.name.split("-")[2]), 0)
        except (ValueError, ProcessLookupError):
            log.info("removing %s, left by an interrupted build", work)
            shutil.rmtree(work, ignore_errors=True)
        except PermissionError:
            pass  # that process exists, under another user


def build_embedded_corpus(
    root: Path,
    n_public: int,
    n_private: int,
    public_utterances: int,
    private_utterances: int,
    seed: int,
    shift: float,
    workers: int = 2,
) -> EmbeddedCorpus:
    """Build (or reuse) the synthetic corpus under ``root/<key>/``, with ``workers`` processes.

    Layout: ``wav/<speaker>/<id>.wav`` (16 kHz, 16-bit PCM), ``public.jsonl`` and ``private.jsonl``
    (:class:`~fl.data.records.Utterance` rows, absolute audio paths), ``speakers.json`` (every
    :class:`SpeakerProfile`) and ``DONE``, written last. The build happens in a work folder that is
    renamed into place when complete, so an interrupted build never looks like a finished one.
    The result does not depend on ``workers`` (1: build in this process; more: a
    :class:`multiprocessing.Pool`, each worker loading eSpeak itself).
    """
    config = {
        "version": CORPUS_VERSION, "espeak": espeak_version(), "n_public": n_public,
        "n_private": n_private, "public_utterances": public_utterances,
        "private_utterances": private_utterances, "seed": seed, "shift": float(shift),
    }  # fmt: skip
    if public_utterances < 0 or private_utterances < 0:
        raise ValueError("utterance counts must be >= 0")
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(root).expanduser().resolve()
    final = root / key
    if root.is_dir():
        _remove_stale_work_dirs(root)
    cached = _load(final)
    if cached is not None:
        log.info("reusing embedded corpus cache %s (%d public, %d private utterances)",
                 final, len(cached.public), len(cached.private))  # fmt: skip
        return cached

    public, private = make_speakers(n_public, n_private, seed, shift)
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-{os.getpid()}-", dir=root))
    work.chmod(0o755)  # mkdtemp's 0700 would keep a shared cache from other users
    start = time.perf_counter()
    log.info("building embedded corpus %s: %d public x %d + %d private x %d utterances",
             final, n_public, public_utterances, n_private, private_utterances)  # fmt: skip
    try:
        jobs = [(s, public_utterances, seed, work, final) for s in public]
        jobs += [(s, private_utterances, seed, work, final) for s in private]
        built: dict[str, list[Utterance]] = {}
        for done, utterances in enumerate(_run_jobs(jobs, workers), 1):
            if utterances:
                built[utterances[0].speaker] = utterances
            log.info("%d/%d speakers done (%.1f s)", done, len(jobs), time.perf_counter() - start)
        corpus = EmbeddedCorpus(
            public=sorted((u for s in public for u in built.get(s.id, [])), key=lambda u: u.id),
            private=sorted((u for s in private for u in built.get(s.id, [])), key=lambda u: u.id),
            root=final,
        )
        write_manifest(corpus.public, work / "public.jsonl")
        write_manifest(corpus.private, work / "private.jsonl")
        profiles = {"config": config, "public": [asdict(s) for s in public], "private": [asdict(s) for s in private]}
        (work / "speakers.json").write_text(json.dumps(profiles, indent=1), encoding="utf-8")
        (work / _DONE).write_text(f"{time.perf_counter() - start:.1f} s\n", encoding="utf-8")
        other = _load(final)  # a concurrent build of the same key may have finished first
        if other is not None:
            shutil.rmtree(work)
            return other
        if final.exists():  # unfinished or missing audio
            shutil.rmtree(final)
        work.rename(final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log.info("built embedded corpus %s in %.1f s", final, time.perf_counter() - start)
    return corpus
