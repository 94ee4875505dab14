"""A round asked again after the server resumed: the device never makes a second, different release.

A resumed server (``server/checkpoint.py``) re-sends the rounds it had not committed, so a device
may be asked to train a round it already answered. The round is identified by its number and a
digest of the global model sent (:func:`round_key`). The device then trains again from the ledger
it had *before* that round, with the same seed, and compares the digest of its new reply with the
one it recorded the first time:

* identical -- sending the same bits again reveals nothing new, so the round counts once;
* different (e.g. ``secure_mode``'s OS randomness) -- the device declines: its first reply may
  have reached the server and stays counted in the ledger, and no second release is made.

The record (``release.json`` in the state folder) is written before the ledger, and both before
the reply. A crash between the two leaves a record of a reply that was never sent and a ledger
without its spend: asked again, the device trains from that same ledger and counts the round once,
and if it is never asked again nothing was released. Either way every reply that left the device
is counted exactly once.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from flwr.app import ArrayRecord, MetricRecord

from fl.privacy.sample import History

RELEASE = "release.json"


@dataclass(frozen=True)
class Release:
    """The device's last training reply: which round, its digest, and the DP-SGD ledger before it."""

    round_key: str
    digest: str
    history_before: Optional[History]


def _hash(arrays: ArrayRecord) -> "hashlib._Hash":
    h = hashlib.sha256()
    for name, array in arrays.items():
        h.update(name.encode())
        h.update(array.data)
    return h


def round_key(server_round: int, arrays: ArrayRecord) -> str:
    """The round number and a SHA-256 of the global model the server sent."""
    return f"{server_round}:{_hash(arrays).hexdigest()}"


def reply_digest(arrays: ArrayRecord, metrics: MetricRecord) -> str:
    """SHA-256 of everything a training reply releases: the update and its metrics."""
    h = _hash(arrays)
    h.update(json.dumps(sorted(metrics.items())).encode())
    return h.hexdigest()


def load(state_dir: Path) -> Optional[Release]:
    path = state_dir / RELEASE
    if not path.exists():
        return None
    rec = json.loads(path.read_text())
    before = rec["history_before"]
    return Release(rec["round_key"], rec["digest"],
                   None if before is None else [(float(z), float(q), int(n)) for z, q, n in before])


def save(state_dir: Path, release: Release) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / RELEASE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(release)))
    tmp.replace(path)
