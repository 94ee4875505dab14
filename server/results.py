"""What a run leaves behind: ``results.jsonl`` (a row per round) and ``summary.json``."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

RESULTS = "results.jsonl"
SUMMARY = "summary.json"


@dataclass(frozen=True)
class RoundRow:
    """One round. Round 0 is the seed model before any federated training.

    ``wer``/``cer``/``loss``: global model on the held-out evaluation speakers (server side); the
    error rates after Whisper's English normaliser, ``raw_wer`` without it (``fl/metrics.py``);
    ``loops_cut``: hypotheses whose runaway decoding was stopped.
    ``device_wer``/``device_cer``: global model on the devices' own local test splits
    (federated evaluation, pooled over all devices' words/characters; only without privacy,
    else null: test metrics are covered by no guarantee).
    ``clients``: updates aggregated; ``declined``: devices that refused (budget spent);
    ``failures``: devices that errored or timed out; ``rejected``: replies the server dropped
    (malformed, non-finite, out of bounds, wrong mechanism parameters).
    ``epsilon_sample``: largest sample-level epsilon of any device in this run so far (null when off).
    ``epsilon_user``: user-level epsilon towards observers of the global models after this round;
    ``epsilon_user_server``: towards the server, for local/distributed noise (null otherwise).
    ``delta``: the sample-level delta (the user-level one when only user-level DP is on);
    ``delta_user``: the user-level delta (null when off).
    ``extrapolated``: the user-level epsilon describes a stated larger deployment, not this run.
    ``randomness``: ``secret`` or the reproducible-noise label (no protection against anyone
    holding the config). ``seconds``: the round's wall time at the server.
    """

    round: int
    wer: float
    cer: float
    loss: float
    device_wer: Optional[float]
    device_cer: Optional[float]
    train_loss: Optional[float]
    clients: int
    declined: int
    failures: int
    rejected: int
    epsilon_sample: Optional[float]
    epsilon_user: Optional[float]
    epsilon_user_server: Optional[float]
    delta: Optional[float]
    delta_user: Optional[float]
    extrapolated: bool
    randomness: str
    seconds: float
    raw_wer: Optional[float] = None
    loops_cut: int = 0


def _clean(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


class ResultsWriter:
    """Appends round rows as they happen, so an interrupted run keeps every finished round."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / RESULTS
        self.path.write_text("")
        self.rows: list[RoundRow] = []

    def append(self, row: RoundRow) -> None:
        self.rows.append(row)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({k: _clean(v) for k, v in asdict(row).items()}) + "\n")
            f.flush()

    def restore(self, rows: list[RoundRow]) -> None:
        """Start over from the committed ``rows`` of an interrupted run (dropping any row written after)."""
        self.path.write_text("")
        self.rows = []
        for row in rows:
            self.append(row)

    def write_summary(self, summary: dict[str, Any]) -> Path:
        return write_summary(self.out_dir, summary)


def write_summary(out_dir: Path, summary: dict[str, Any]) -> Path:
    """Write ``summary.json`` atomically."""
    path = Path(out_dir) / SUMMARY
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=2, default=_clean))
    tmp.replace(path)
    return path


def read_results(out_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (Path(out_dir) / RESULTS).read_text().splitlines() if line]
