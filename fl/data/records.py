"""The one record every corpus reader produces: an utterance on disk with its transcript (if it has one)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Optional


@dataclass(frozen=True)
class Utterance:
    """One recording and what was said in it.

    ``duration`` is in seconds (0.0 when the reader could not know it without decoding audio).
    ``text`` is None for a recording without a transcript (an unlabelled corpus: what a device holds).
    """

    id: str
    audio: str
    text: Optional[str]
    speaker: str
    duration: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @staticmethod
    def from_dict(row: dict) -> "Utterance":
        return Utterance(
            id=str(row["id"]),
            audio=str(row["audio"]),
            text=None if row.get("text") is None else str(row["text"]),
            speaker=str(row["speaker"]),
            duration=float(row.get("duration", 0.0) or 0.0),
        )


def write_manifest(utterances: Iterable[Utterance], path: Path) -> None:
    """Write utterances as JSONL (one object a line), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for u in utterances:
            f.write(u.to_json() + "\n")
    tmp.replace(path)


def group_by_speaker(utterances: Iterable[Utterance]) -> dict[str, list[Utterance]]:
    """Speaker id -> that speaker's utterances, speakers and utterances in sorted order."""
    out: dict[str, list[Utterance]] = {}
    for u in utterances:
        out.setdefault(u.speaker, []).append(u)
    return {s: sorted(us, key=lambda u: u.id) for s, us in sorted(out.items())}

