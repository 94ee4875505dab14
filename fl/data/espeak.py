"""A small ctypes binding to eSpeak NG, as shipped (library and voice data) by ``espeakng-loader``.

eSpeak NG keeps synthesis state in C globals that neither ``espeak_Terminate`` nor a new
``espeak_Initialize`` resets (the pitch-flutter phase, the automatic gain control, the echo buffer),
so the same call made twice in one process gives slightly different audio. To make every call a
pure function of its arguments, :func:`synthesize` loads a *private copy* of the library (copied
once per process, lazily, under a lock) into a fresh instance, synthesizes in synchronous mode
(``AUDIO_OUTPUT_SYNCHRONOUS``, 16-bit PCM through a callback at :data:`ESPEAK_RATE`) and unloads it
again. That costs about a millisecond on top of synthesis. The private copy also keeps this module
from sharing (and terminating) an instance that other code in the process loaded from the wheel.
"""

from __future__ import annotations

import _ctypes
import atexit
import ctypes
import logging
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

ESPEAK_RATE = 22050
"""Sample rate (Hz) of everything eSpeak NG's own voices produce."""

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_PARAM_RATE, _PARAM_PITCH, _PARAM_RANGE, _PARAM_WORDGAP = 1, 3, 4, 7
_EE_OK = 0

_SynthCallback = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


@dataclass(frozen=True)
class _Engine:
    """Where the private library copy and the voice data are, and what voices the data holds."""

    library: Path
    data: Path
    version: str
    languages: frozenset[str]
    variants: frozenset[str]


_LOCK = threading.Lock()
_ENGINE: _Engine | None = None
_CHUNKS: list[np.ndarray] = []
_LIBC = ctypes.CDLL(None)


@_SynthCallback
def _collect(wav: ctypes.Array, n: int, _events: int) -> int:
    """eSpeak's synth callback: keep a copy of each block of samples; 0 means 'go on'."""
    if n > 0 and wav:
        _CHUNKS.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
    return 0


def _open(engine_library: Path, data: Path) -> ctypes.CDLL:
    """Load a fresh library instance, declare the functions used, and initialise it."""
    try:
        lib = ctypes.CDLL(str(engine_library))
    except OSError as e:
        raise RuntimeError(
            f"could not load the eSpeak NG library {engine_library}: {e}. "
            "Reinstall the 'espeakng-loader' package."
        ) from e
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_Initialize.restype = ctypes.c_int
    lib.espeak_Info.argtypes = [ctypes.c_void_p]
    lib.espeak_Info.restype = ctypes.c_char_p
    lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
    lib.espeak_Synth.argtypes = [
        ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
        ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
    ]  # fmt: skip
    rate = lib.espeak_Initialize(
        _AUDIO_OUTPUT_SYNCHRONOUS, 0, str(data).encode(), _INITIALIZE_DONT_EXIT
    )
    if rate != ESPEAK_RATE:
        _close(lib)
        raise RuntimeError(
            f"eSpeak NG failed to initialise with voice data {data} (returned {rate}, expected "
            f"{ESPEAK_RATE}). Reinstall the 'espeakng-loader' package."
        )
    lib.espeak_SetSynthCallback(_collect)
    return lib


def _close(lib: ctypes.CDLL) -> None:
    """Terminate and unload an instance, so that the next :func:`_open` starts from scratch."""
    lib.espeak_Terminate()
    _ctypes.dlclose(lib._handle)


def _scan_voices(data: Path) -> tuple[frozenset[str], frozenset[str]]:
    """Language names (``en-us``) from ``lang/``, variant names (``m3``, ``klatt``) from ``voices/!v``."""
    languages: set[str] = set()
    for f in (data / "lang").rglob("*"):
        if f.is_file():
            for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "language":
                    languages.add(parts[1].lower())
    variants = {f.name for f in (data / "voices" / "!v").iterdir() if f.is_file() and " " not in f.name}
    return frozenset(languages), frozenset(variants)


def _make_engine() -> _Engine:
    """Find the wheel's library and data, copy the library privately, and check it works."""
    try:
        import espeakng_loader
    except ImportError as e:
        raise RuntimeError(
            "eSpeak NG is unavailable: install the 'espeakng-loader' package."
        ) from e
    source = Path(espeakng_loader.get_library_path())
    try:
        data = Path(espeakng_loader.get_data_path())
    except RuntimeError as e:
        raise RuntimeError(f"eSpeak NG voice data is missing: {e}. Reinstall 'espeakng-loader'.") from e
    if not source.is_file():
        raise RuntimeError(f"eSpeak NG library {source} does not exist. Reinstall 'espeakng-loader'.")
    private_dir = Path(tempfile.mkdtemp(prefix="unheard-espeak-"))
    atexit.register(shutil.rmtree, private_dir, True)
    library = private_dir / source.name
    shutil.copy2(source, library)
    lib = _open(library, data)
    try:
        version = (lib.espeak_Info(None) or b"?").decode()
    finally:
        _close(lib)
    languages, variants = _scan_voices(data)
    log.info("eSpeak NG %s loaded (%d languages, %d variants)", version, len(languages), len(variants))
    return _Engine(library, data, version, languages, variants)


def _engine() -> _Engine:
    global _ENGINE
    with _LOCK:
        if _ENGINE is None:
            _ENGINE = _make_engine()
        return _ENGINE


def espeak_version() -> str:
    """The version string of the eSpeak NG library in use (e.g. ``1.52.0``)."""
    return _engine().version


def available_languages() -> frozenset[str]:
    """Language voice names the bundled data holds, lowercase (``en-us``, ``en-gb-scotland``, ...)."""
    return _engine().languages


def available_variants() -> frozenset[str]:
    """Voice variant names the bundled data holds (``m3``, ``f2``, ``klatt``, ...)."""
    return _engine().variants


def check_voice(voice: str) -> None:
    """Raise ``ValueError`` unless ``voice`` is ``language`` or ``language+variant`` that exists.

    eSpeak itself silently falls back to a default for unknown variants, which would make two
    'different' speakers sound the same; this check makes such a typo loud.
    """
    engine = _engine()
    language, _, variant = voice.partition("+")
    if language.lower() not in engine.languages:
        raise ValueError(f"unknown eSpeak language {language!r}; e.g. {sorted(engine.languages)[:8]}")
    if variant and variant not in engine.variants:
        raise ValueError(f"unknown eSpeak variant {variant!r}; e.g. {sorted(engine.variants)[:8]}")


def synthesize(
    text: str,
    voice: str,
    pitch: int = 50,
    rate: int = 160,
    pitch_range: int = 50,
    word_gap: int = 0,
    seed: int = 0,
) -> np.ndarray:
    """Speak ``text`` and return float32 mono audio in [-1, 1) at :data:`ESPEAK_RATE` Hz.

    ``voice`` is an eSpeak voice name with an optional variant (``en-us``, ``en-gb-scotland+f2``);
    ``pitch`` (0-99) is the base pitch, ``rate`` the speaking rate in words per minute (80-450),
    ``pitch_range`` (0-99) how much intonation varies, ``word_gap`` extra pause between words in
    units of 10 ms, and ``seed`` fixes the breath/aspiration noise some variants add. The result
    depends on the arguments only, never on earlier calls. Thread-safe (calls are serialised).
    """
    if not text.strip():
        raise ValueError("nothing to synthesize: text is empty")
    if not (0 <= pitch <= 99 and 0 <= pitch_range <= 99):
        raise ValueError(f"pitch ({pitch}) and pitch_range ({pitch_range}) must be in 0..99")
    if not 80 <= rate <= 450:
        raise ValueError(f"rate must be 80..450 words per minute, got {rate}")
    check_voice(voice)
    engine = _engine()
    encoded = text.encode("utf-8") + b"\0"
    with _LOCK:
        lib = _open(engine.library, engine.data)
        _CHUNKS.clear()
        try:
            if lib.espeak_SetVoiceByName(voice.encode()) != _EE_OK:
                raise RuntimeError(f"eSpeak NG could not select voice {voice!r}")
            for param, value in ((_PARAM_RATE, rate), (_PARAM_PITCH, pitch),
                                 (_PARAM_RANGE, pitch_range), (_PARAM_WORDGAP, word_gap)):  # fmt: skip
                lib.espeak_SetParameter(param, value, 0)
            lib.espeak_ng_SetRandSeed(seed)
            _LIBC.srand(seed & 0xFFFFFFFF)  # the Klatt voices draw from libc's rand()
            status = lib.espeak_Synth(encoded, len(encoded), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
            if status != _EE_OK:
                raise RuntimeError(f"eSpeak NG failed to synthesize {text!r} (status {status})")
            lib.espeak_Synchronize()
            pcm = np.concatenate(_CHUNKS) if _CHUNKS else np.zeros(0, dtype=np.int16)
        finally:
            _CHUNKS.clear()
            _close(lib)
    return pcm.astype(np.float32) / 32768.0
