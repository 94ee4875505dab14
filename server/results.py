"""What a run leaves behind: ``results.jsonl`` (a row per round) and ``summary.json``, published;
``private/rounds-private.jsonl``, the experimenter's alone.

Published outputs carry only values an epsilon covers (or public config). A round's realised
counts -- updates aggregated, devices that declined, failed or were rejected -- and its wall time
are covered by none: under Poisson sampling the cohort's size is a count query of sensitivity 1,
and a wall time follows the devices' data. Under any privacy level a published row therefore says
the **expected** cohort (public config) instead, and the realised figures go to the server's
private folder (owner-only, :data:`PRIVATE_ROUNDS` and :data:`PRIVATE_SUMMARY`), beside its
state; without privacy a row keeps them too (:func:`split_row`). ``experimenter_view.json``
(:data:`EXPERIMENTER_VIEW`) holds what only a simulation's experimenter can compute and no DP covers.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from server.checkpoint import PRIVATE

RESULTS = "results.jsonl"
SUMMARY = "summary.json"
PRIVATE_ROUNDS = "rounds-private.jsonl"
"""In the server's private folder (``private/``, 0700; the file 0600): a round's realised figures."""
EXPERIMENTER_VIEW = "experimenter_view.json"
EXPERIMENTER_LABEL = "experimenter view, not covered by DP"


@dataclass(frozen=True)
class RoundRow:
    """One round. Round 0 is the seed model before any federated training.

    ``wer``/``cer``/``loss``: global model on the held-out evaluation speakers (server side); the
    error rates after Whisper's English normaliser, ``raw_wer`` without it (``fl/metrics.py``);
    ``loops_cut``: hypotheses whose runaway decoding was stopped. All null in a round not scored
    (``federation.eval_every``; the seed and the final model always are).
    ``device_wer``/``device_cer``: global model on the devices' own local test splits
    (federated evaluation, pooled over all devices' words/characters; only without privacy,
    else null: test metrics are covered by no guarantee).
    ``clients``: updates aggregated; ``declined``: devices that refused (budget spent);
    ``failures``: devices that errored or timed out; ``rejected``: replies the server dropped
    (malformed, non-finite, out of bounds, wrong mechanism parameters): the :data:`REALISED`
    figures, published only without privacy (see the module doc).
    ``epsilon_sample``: largest sample-level epsilon of any device in this run so far (null when off).
    ``epsilon_user``: user-level epsilon towards observers of the global models after this round;
    ``epsilon_user_server``: towards the server, for local/distributed noise (null otherwise).
    ``delta``: the sample-level delta (the user-level one when only user-level DP is on);
    ``delta_user``: the user-level delta (null when off).
    ``extrapolated``: the user-level epsilon describes a stated larger deployment, not this run.
    ``randomness``: ``secret`` or the reproducible-noise label (no protection against anyone
    holding the config). ``seconds``: the round's wall time at the server (realised: private under DP).
    A published row adds ``expected_cohort``: the devices a round asks on average (public config;
    0 for round 0).
    """

    round: int
    wer: Optional[float]
    cer: Optional[float]
    loss: Optional[float]
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
    loops_cut: Optional[int] = 0


REALISED = ("clients", "declined", "failures", "rejected", "seconds")
"""A round's realised counts and wall time: covered by no epsilon, so private under any privacy level."""
DEVICE_REPORTED = ("device_wer", "device_cer", "train_loss")
"""Figures only devices report, which they send only without privacy (always null under it)."""
PUBLISHED_UNDER_PRIVACY = frozenset(
    {"round", "wer", "cer", "raw_wer", "loss", "loops_cut", "epsilon_sample", "epsilon_user", "epsilon_user_server",
     "delta", "delta_user", "extrapolated", "randomness", "expected_cohort"})
"""Exactly the fields of a published row under sample- or user-level DP: the server's held-out
scores of the released model, the epsilons with their deltas and labels, and public config."""
PRIVATE_FIELDS = ("round", *REALISED)
"""The fields of a row of :data:`PRIVATE_ROUNDS` (every mode)."""


def _clean(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def split_row(row: RoundRow, private: bool, expected_cohort: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The published part of ``row`` and its private part (``PRIVATE_FIELDS``).

    Under privacy (``private``) the published part is exactly :data:`PUBLISHED_UNDER_PRIVACY`: no
    realised count, no wall time, no device-reported figure; without privacy it is the whole row.
    Both carry ``round``; ``expected_cohort`` is published for rounds after the seed's (0 for it).
    """
    full = {k: _clean(v) for k, v in asdict(row).items()}
    full["expected_cohort"] = expected_cohort if row.round > 0 else 0
    published = {k: v for k, v in full.items() if k in PUBLISHED_UNDER_PRIVACY} if private else full
    return published, {k: full[k] for k in PRIVATE_FIELDS}


def _append_private(path: Path, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()


class ResultsWriter:
    """Appends round rows as they happen, so an interrupted run keeps every finished round.

    Each row is split (:func:`split_row`): its published part goes to ``results.jsonl``, its
    realised figures to ``private_dir/rounds-private.jsonl`` (``private_dir``: the server's private
    folder, owner-only; None keeps them nowhere but ``rows``)."""

    def __init__(self, out_dir: Path, private: bool = False, expected_cohort: int = 0,
                 private_dir: Optional[Path] = None) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / RESULTS
        self.private, self.expected_cohort = private, expected_cohort
        self.private_path = Path(private_dir) / PRIVATE_ROUNDS if private_dir is not None else None
        self.rows: list[RoundRow] = []
        self._truncate()

    def _truncate(self) -> None:
        self.path.write_text("")
        if self.private_path is not None:
            fd = os.open(self.private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.close(fd)

    def append(self, row: RoundRow) -> None:
        self.rows.append(row)
        published, realised = split_row(row, self.private, self.expected_cohort)
        if self.private_path is not None:
            _append_private(self.private_path, json.dumps(realised) + "\n")
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(published) + "\n")
            f.flush()

    def restore(self, rows: list[RoundRow]) -> None:
        """Start over from the committed ``rows`` of an interrupted run (dropping any row written after)."""
        self._truncate()
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


def read_private_rounds(out_dir: Path) -> list[dict[str, Any]]:
    """The realised figures of every round (``private/rounds-private.jsonl``: the experimenter's own
    view; empty if the file is missing or not readable by this user)."""
    path = Path(out_dir) / PRIVATE / PRIVATE_ROUNDS
    try:
        text = path.read_text()
    except OSError:
        return []
    return [json.loads(line) for line in text.splitlines() if line]


PRIVATE_SUMMARY = "summary-private.json"
"""In the server's private folder: the run's realised totals (wall time, devices charged)."""


def write_private_summary(private_dir: Path, figures: dict[str, Any]) -> Path:
    """Write ``private_dir/summary-private.json`` (owner-only) atomically."""
    path = Path(private_dir) / PRIVATE_SUMMARY
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(json.dumps({"label": "experimenter only: realised figures no epsilon covers", **figures}, indent=2,
                           default=_clean))
    tmp.replace(path)
    return path


def write_experimenter_view(out_dir: Path, view: dict[str, Any]) -> Path:
    """Write ``experimenter_view.json`` atomically, labelled as covered by no DP guarantee."""
    path = Path(out_dir) / EXPERIMENTER_VIEW
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"label": EXPERIMENTER_LABEL, **view}, indent=2, default=_clean))
    tmp.replace(path)
    return path


def read_experimenter_view(out_dir: Path) -> Optional[dict[str, Any]]:
    path = Path(out_dir) / EXPERIMENTER_VIEW
    return json.loads(path.read_text()) if path.exists() else None
