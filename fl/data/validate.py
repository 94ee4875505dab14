"""`unheard-data validate PATH`: check a corpus the way training will read it, before training does.

PATH is a Kaldi data dir, a folder of recordings with transcripts beside them, an FSDD or
LibriSpeech folder, or a JSONL manifest (detected, or given with ``--kind``). Every recording is
read by the reader and then decoded exactly as featurisation does (``fl/data/audio.py``), so what
this reports is what a run would skip: one line per problem (utterance id and reason), then a
summary. A corpus without transcripts is reported as *unlabelled* (trainable with
``train.labels=pseudo`` or ``corrections``, not evaluable), which is no problem. Exit status 0 when
clean, 1 when anything was found; never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import soundfile as sf

from fl.data.audio import DEFAULT_MAX_SECONDS, TARGET_SR, AudioError, load_audio
from fl.data.readers import READERS, CorpusError, Problem, problem_summary, read_corpus

log = logging.getLogger(__name__)


def detect_kind(path: Path) -> str:
    """The reader for ``path``: manifest (a file), kaldi, fsdd, librispeech or folder."""
    if path.is_file():
        return "manifest"
    if (path / "wav.scp").is_file():
        return "kaldi"
    if (path / "recordings").is_dir() or next(path.glob("[0-9]_*_[0-9]*.wav"), None) is not None:
        return "fsdd"
    if next(path.rglob("*.trans.txt"), None) is not None:
        return "librispeech"
    return "folder"


@dataclass
class Validation:
    """What a corpus holds: usable recordings, problems, and conversions training will make."""

    kind: str
    usable: int = 0
    seconds: float = 0.0
    problems: list[Problem] = field(default_factory=list)
    conversions: Counter = field(default_factory=Counter)
    labelled: bool = True


def validate(path: Path, kind: Optional[str] = None, max_seconds: float = DEFAULT_MAX_SECONDS) -> Validation:
    """Read and decode every recording under ``path``; raises :class:`CorpusError` if it is not a corpus."""
    kind = kind or detect_kind(path)
    read = read_corpus(kind, path)
    report = Validation(kind, problems=list(read.problems), labelled=read.labelled)
    for u in read.utterances:
        try:
            info = sf.info(u.audio)
            audio = load_audio(u.audio, max_seconds=max_seconds)
        except AudioError as err:
            report.problems.append(Problem(u.id, err.reason))
            continue
        except (sf.LibsndfileError, RuntimeError) as err:
            report.problems.append(Problem(u.id, f"unreadable or corrupt audio ({err})"))
            continue
        if info.channels > 1:
            report.conversions[f"{info.channels} channels averaged to mono"] += 1
        if info.samplerate != TARGET_SR:
            report.conversions[f"resampled from {info.samplerate} Hz to {TARGET_SR} Hz"] += 1
        report.usable += 1
        report.seconds += len(audio) / TARGET_SR
    return report


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="unheard-data", description="check speech data before training on it")
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="report every recording a run would skip, and why")
    v.add_argument("path", type=Path)
    v.add_argument("--kind", choices=sorted(READERS), help="corpus layout (default: detected)")
    v.add_argument("--max-seconds", type=float, default=DEFAULT_MAX_SECONDS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    out = sys.stdout
    try:
        report = validate(args.path, args.kind, args.max_seconds)
    except (CorpusError, OSError, ValueError) as err:
        out.write(f"{args.path}: {err}\n")
        sys.exit(1)
    for p in report.problems:
        out.write(f"{p.utterance_id}: {p.reason}\n")
    labels = "" if report.labelled else ", unlabelled"
    out.write(f"{args.path} ({report.kind}{labels}): {report.usable} usable recordings "
              f"({report.seconds / 3600:.2f} h), {len(report.problems)} problems\n")
    if not report.labelled:
        out.write("  unlabelled: no transcripts; devices train on it only with train.labels=pseudo or corrections, "
                  "and it cannot score a model (no references)\n")
    for reason, n in problem_summary(report.problems).most_common():
        out.write(f"  {n} x {reason}\n")
    for what, n in report.conversions.most_common():
        out.write(f"  note: {n} x {what}\n")
    sys.exit(1 if report.problems else 0)


if __name__ == "__main__":
    main()
