"""Corpus readers: a folder on disk -> the utterances in it, plus every item skipped and why.

Readers never decode audio: they check that each file exists and read its duration from the header
(``soundfile.info``). A bad line or item becomes a :class:`Problem` and the read goes on; only a
missing or malformed corpus folder raises :class:`CorpusError`. Transcripts are passed through
:func:`~fl.data.text.normalize_transcript` and must encode with :class:`~fl.data.text.CharTokenizer`.

A corpus is labelled or unlabelled as a whole: a Kaldi dir without ``text``, a folder with no
``.txt`` beside any recording, a manifest none of whose lines has a ``text`` field is *unlabelled*
(``ReadResult.labelled`` False, every transcript None: a device's recordings, for
``train.labels=pseudo|corrections``). In a labelled corpus, a recording without its transcript
stays a problem, as before.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import soundfile as sf

from fl.data.records import Utterance
from fl.data.text import CharTokenizer, TextError, normalize_transcript

log = logging.getLogger(__name__)

_TOKENIZER = CharTokenizer()
FSDD_DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
FSDD_TEST_INDICES = range(0, 5)
"""FSDD's official split: recordings with these indices are the test set, the rest training."""
_FSDD_NAME = re.compile(r"^(\d)_([A-Za-z0-9]+)_(\d+)$")


class CorpusError(ValueError):
    """The corpus folder itself is missing or not laid out as the reader expects."""


@dataclass(frozen=True)
class Problem:
    """An item a reader skipped, and why (``reason`` may quote the item: logs use ``problem_summary``)."""

    utterance_id: str
    reason: str


@dataclass
class ReadResult:
    """What a reader found: usable utterances (sorted by id) and the skipped items; ``labelled``
    False for a corpus without transcripts (every utterance's ``text`` is None)."""

    utterances: list[Utterance] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    labelled: bool = True


class _Collector:
    """Validates candidate items one by one into a :class:`ReadResult`."""

    def __init__(self, labelled: bool = True) -> None:
        self.result = ReadResult(labelled=labelled)

    def skip(self, utterance_id: str, reason: str) -> None:
        self.result.problems.append(Problem(utterance_id, reason))

    def add(
        self, uid: str, audio: Path, raw_text: Optional[str], speaker: str, duration: float | None = None
    ) -> None:
        """Add the utterance, or record why it is skipped (text first, then the audio header);
        ``raw_text`` None: a recording of an unlabelled corpus."""
        text = None if raw_text is None else normalize_transcript(raw_text)
        if raw_text is not None and not text:
            return self.skip(uid, f"empty transcript after normalisation ({raw_text!r})")
        try:
            if text is not None:
                _TOKENIZER.encode(text)
        except TextError as e:
            return self.skip(uid, str(e))
        if not speaker:
            return self.skip(uid, "empty speaker id")
        if not audio.is_file():
            return self.skip(uid, f"audio file not found: {audio}")
        if duration is None:
            try:
                duration = float(sf.info(str(audio)).duration)
            except (sf.LibsndfileError, RuntimeError) as e:
                return self.skip(uid, f"unreadable audio header: {audio} ({e})")
        self.result.utterances.append(Utterance(uid, str(audio), text, speaker, duration))

    def finish(self, kind: str, path: Path) -> ReadResult:
        """Sort, log a one-line summary, return."""
        r = self.result
        r.utterances.sort(key=lambda u: u.id)
        speakers = len({u.speaker for u in r.utterances})
        hours = sum(u.duration for u in r.utterances) / 3600
        reasons = "; ".join(f"{n} x {why}" for why, n in problem_summary(r.problems).most_common())
        log.info(
            "read %s%s corpus %s: %d utterances, %d speakers, %.2f h, %d skipped%s",
            "" if r.labelled else "unlabelled ", kind, path, len(r.utterances), speakers, hours, len(r.problems),
            f" ({reasons})" if reasons else "",
        )
        return r


def _require_dir(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise CorpusError(f"{path}: not a directory; expected {what}")
    return path


def _read_table(
    file: Path, name: str, c: _Collector, need_value: bool = True
) -> tuple[dict[str, str], set[str]]:
    """Parse ``<id> <value>`` lines. Returns (id -> value, ids to drop: malformed or duplicated)."""
    table: dict[str, str] = {}
    bad: set[str] = set()
    for n, line in enumerate(file.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        parts = line.strip().split(maxsplit=1)
        if not parts:
            continue
        uid, value = parts[0], (parts[1].strip() if len(parts) > 1 else "")
        if uid in table or uid in bad:
            if uid not in bad:
                c.skip(uid, f"duplicate id in {name} (again on line {n})")
            bad.add(uid)
        elif need_value and not value:
            c.skip(uid, f"malformed line in {name} (line {n}: expected '<id> <value>')")
            bad.add(uid)
        else:
            table[uid] = value
    return {k: v for k, v in table.items() if k not in bad}, bad


def read_kaldi_dir(path: str | Path, audio_root: str | Path | None = None) -> ReadResult:
    """Read a Kaldi data directory (``wav.scp``, ``text``, ``utt2spk``); without ``text``, an unlabelled one.

    Relative audio paths in ``wav.scp`` are resolved against ``audio_root`` when given, else
    against the directory's parent (the corpus root, as in speechocean762) and then the directory
    itself. Piped commands (``... |``) are not supported and become problems.
    """
    path = _require_dir(path, "a Kaldi data directory with wav.scp, utt2spk and (if labelled) text")
    missing = [f for f in ("wav.scp", "utt2spk") if not (path / f).is_file()]
    if missing:
        raise CorpusError(f"{path}: not a Kaldi data directory, missing {', '.join(missing)}")
    labelled = (path / "text").is_file()
    c = _Collector(labelled)
    wavs, bad = _read_table(path / "wav.scp", "wav.scp", c)
    texts, bad_text = _read_table(path / "text", "text", c, need_value=False) if labelled else ({}, set())
    spks, bad_spk = _read_table(path / "utt2spk", "utt2spk", c)
    for name, table in (("text", texts), ("utt2spk", spks)):
        for uid in sorted(table.keys() - wavs.keys() - bad):
            c.skip(uid, f"listed in {name} but not in wav.scp")
    roots = [Path(audio_root)] if audio_root is not None else [path.parent, path]
    for uid, target in sorted(wavs.items()):
        if uid in bad_text or uid in bad_spk:
            continue  # already reported
        if target.endswith("|"):
            c.skip(uid, "pipe commands are not supported")
        elif labelled and uid not in texts:
            c.skip(uid, "no transcript in text")
        elif uid not in spks:
            c.skip(uid, "no speaker in utt2spk")
        else:
            audio = Path(target)
            if not audio.is_absolute():
                audio = next((r / audio for r in roots if (r / audio).is_file()), roots[0] / audio)
            c.add(uid, audio.resolve(), texts[uid] if labelled else None, spks[uid])
    return c.finish("kaldi", path)


def read_fsdd(path: str | Path, split: str = "all") -> ReadResult:
    """Read the Free Spoken Digit Dataset: ``recordings/{digit}_{speaker}_{index}.wav``.

    ``path`` is the folder holding ``recordings/`` or ``recordings/`` itself. ``split`` is "all",
    "train" (indices 5 and up) or "test" (indices 0-4, the official test set).
    """
    if split not in ("all", "train", "test"):
        raise ValueError(f"unknown FSDD split {split!r}; expected 'all', 'train' or 'test'")
    path = _require_dir(path, "the FSDD folder (holding recordings/) or its recordings/ folder")
    rec = path / "recordings" if (path / "recordings").is_dir() else path
    files = sorted(rec.glob("*.wav"))
    if not files:
        raise CorpusError(f"{rec}: no .wav files; expected FSDD's {{digit}}_{{speaker}}_{{index}}.wav")
    c = _Collector()
    for f in files:
        m = _FSDD_NAME.match(f.stem)
        if m is None:
            c.skip(f.stem, "file name does not match {digit}_{speaker}_{index}.wav")
            continue
        digit, speaker, index = int(m[1]), m[2], int(m[3])
        if split == "all" or (index in FSDD_TEST_INDICES) == (split == "test"):
            c.add(f.stem, f.resolve(), FSDD_DIGITS[digit], speaker)
    return c.finish("fsdd", path)


def read_librispeech(path: str | Path) -> ReadResult:
    """Read a LibriSpeech split: ``{speaker}/{chapter}/{speaker}-{chapter}.trans.txt`` + ``.flac``.

    ``path`` may be a split folder (``train-clean-100``) or any folder above the speaker folders.
    """
    path = _require_dir(path, "a LibriSpeech split folder (speaker/chapter/*.trans.txt)")
    transcripts = sorted(path.rglob("*.trans.txt"))
    if not transcripts:
        raise CorpusError(f"{path}: no *.trans.txt files; expected speaker/chapter/*.trans.txt")
    c = _Collector()
    seen: set[str] = set()
    for trans in transcripts:
        speaker = trans.parent.parent.name
        table, bad = _read_table(trans, trans.name, c)
        for uid, text in sorted(table.items()):
            if uid in seen:
                c.skip(uid, f"duplicate id (again in {trans})")
            else:
                seen.add(uid)
                c.add(uid, (trans.parent / f"{uid}.flac").resolve(), text, speaker)
        seen |= bad
    return c.finish("librispeech", path)


def read_manifest(path: str | Path) -> ReadResult:
    """Read a JSONL manifest: one ``{"id", "audio", "text", "speaker"[, "duration"]}`` a line; a
    manifest none of whose lines has ``text`` is an unlabelled one.

    Relative ``audio`` paths are resolved against the manifest's folder. Items are identified in
    problems by their id, or by ``line N`` when the line has no usable id.
    """
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"{path}: not a file; expected a JSONL manifest")
    rows: list[tuple[int, object]] = []  # a line's object, or the JSON error it raised
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if line.strip():
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                rows.append((n, e))
    labelled = any(isinstance(row, dict) and "text" in row for _, row in rows)
    c = _Collector(labelled)
    seen: set[str] = set()
    fields = ("id", "audio", "text", "speaker") if labelled else ("id", "audio", "speaker")
    for n, row in rows:
        if isinstance(row, json.JSONDecodeError):
            c.skip(f"line {n}", f"invalid JSON ({row.msg})")
            continue
        if not isinstance(row, dict):
            c.skip(f"line {n}", "expected a JSON object")
            continue
        uid = str(row.get("id") or f"line {n}")
        absent = [k for k in fields if row.get(k) in (None, "")]
        if absent:
            c.skip(uid, f"missing field(s) {', '.join(absent)} (line {n})")
            continue
        if uid in seen:
            c.skip(uid, f"duplicate id (again on line {n})")
            continue
        seen.add(uid)
        try:
            duration = float(row.get("duration") or 0.0) or None  # 0 or absent: read the header
        except (TypeError, ValueError):
            c.skip(uid, f"duration is not a number (line {n}: {row['duration']!r})")
            continue
        audio = Path(str(row["audio"]))
        audio = audio if audio.is_absolute() else path.parent / audio
        c.add(uid, audio.resolve(), str(row["text"]) if labelled else None, str(row["speaker"]), duration)
    return c.finish("manifest", path)


AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")


def read_folder(path: str | Path) -> ReadResult:
    """Read a folder of recordings, each with a transcript beside it: ``clip.wav`` + ``clip.txt``.

    Searched recursively (``.wav``, ``.flac``, ``.ogg``). The utterance id is the path relative to
    ``path`` without suffix; the speaker is the recording's parent folder name (the folder itself
    for files at the top). What a device owner most easily has: their recordings and what was said.
    A folder with no transcript beside any recording is unlabelled: what a device holds without one.
    """
    path = _require_dir(path, "a folder of recordings (clip.wav) with transcripts beside them (clip.txt)")
    audio_files = sorted(p for p in path.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
    labelled = any(a.with_suffix(".txt").is_file() for a in audio_files)
    c = _Collector(labelled)
    seen: set[str] = set()
    for audio in audio_files:
        uid = str(audio.relative_to(path).with_suffix(""))
        if uid in seen:
            c.skip(uid, f"two recordings with this name ({audio.name}): ambiguous")
            continue
        seen.add(uid)
        transcript = audio.with_suffix(".txt")
        if labelled and not transcript.is_file():
            c.skip(uid, f"no transcript: expected {transcript.name} beside {audio.name}")
            continue
        text = transcript.read_text(encoding="utf-8", errors="replace").strip() if labelled else None
        c.add(uid, audio.resolve(), text, audio.parent.name if audio.parent != path else path.name)
    return c.finish("folder", path)


READERS: dict[str, Callable[[Path], ReadResult]] = {
    "kaldi": read_kaldi_dir,
    "folder": read_folder,
    "fsdd": read_fsdd,
    "librispeech": read_librispeech,
    "manifest": read_manifest,
}
"""Corpus kind -> reader, as named in configs."""


def read_corpus(kind: str, path: str | Path) -> ReadResult:
    """Read the corpus at ``path`` with the reader for ``kind`` (one of :data:`READERS`)."""
    reader = READERS.get(kind)
    if reader is None:
        raise ValueError(f"unknown corpus kind {kind!r}; expected one of {sorted(READERS)}")
    return reader(Path(path))


def problem_summary(problems: list[Problem]) -> Counter[str]:
    """Count problems by reason, with ids and paths stripped from the reason, for reports."""
    return Counter(re.sub(r"[:(].*", "", p.reason).strip() for p in problems)
