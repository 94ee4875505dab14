"""A device's persistent, private state: one folder, one owner, one write order.

Everything a device must remember between rounds, runs and crashes lives in its state folder and
is read and written only through :class:`DeviceState`:

* ``secret`` -- the device's 256-bit secret (``fl/privacy/randomness.py``), mode 0600: every DP draw
  of the device (DP-SGD noise, Poisson batches, user-level noise share) comes from it, so nobody
  else -- the server included -- can regenerate them. Never sent.
* ``ledger.json`` -- the DP-SGD history ``(noise_multiplier, sample_rate, steps)`` over every run:
  the device's own cumulative sample-level epsilon and its budget (``max_epsilon``).
* ``release.json`` -- the last training release: the round it answered (number and SHA-256 of the
  global model), a digest of the reply, the ledger before it, and its release index. Every new
  release takes the next index, and the index names the secret streams it draws from, so no two
  different releases ever share noise. A round asked again (a resumed server) is answered as
  :meth:`DeviceState.plan` says: trained again from the same ledger with the same index, it gives
  the same bits -- sending them again reveals nothing new, and the round counts once; if the reply
  would differ, the device declines and its first release stays counted. (A request is its round
  number and global model: another run that asks exactly the last request again -- same seed model,
  same round -- gets the same bits too, for free.)
* ``rounds.jsonl`` -- the rounds this device trained in (round, its key, steps, utterances held, seconds):
  for the device's owner, and for a simulation's audit and benchmark. Never sent.
* ``status.json`` -- why the device last declined, for its owner.
* ``device-key`` -- a deployed device's random 52-bit name (``key``), the one value it sends about itself.

Write order (:meth:`DeviceState.commit`), all before the reply leaves: release record, then
ledger, then round history. A training request holds the folder's lock (:meth:`DeviceState.locked`)
from planning to commit, so two runs using one device never interleave their ledger updates. A
crash between any two leaves a release record of a reply that was
never sent: asked again, the device trains from the recorded ledger-before and counts the round
once; never asked again, nothing was released. Every reply that left the device is counted in its
ledger exactly once.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import secrets
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from flwr.app import ArrayRecord, MetricRecord

from fl.privacy.randomness import Secret, private_dir
from fl.privacy.sample import History, SampleAccount

SECRET, LEDGER, RELEASE, HISTORY, STATUS, KEY = (
    "secret", "ledger.json", "release.json", "rounds.jsonl", "status.json", "device-key")


@dataclass(frozen=True)
class Release:
    """The device's last training reply: which round, its digest, the DP-SGD ledger before it, its index."""

    round_key: str
    digest: str
    history_before: Optional[History]
    index: int


@dataclass(frozen=True)
class Plan:
    """How to answer one train request: the release ``index`` (names the secret streams), the
    ledger to train from, and the earlier release this one must reproduce (None for a new round)."""

    index: int
    history: Optional[History]
    replaying: Optional[Release]


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


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def _history(raw: Any) -> History:
    return [(float(z), float(q), int(n)) for z, q, n in raw]


class DeviceState:
    """One device's state folder (see the module doc). ``reproducible=(seed, key)`` derives the
    secret from the config seed instead of the OS CSPRNG: simulations for exact reruns only."""

    def __init__(self, root: Path, reproducible: Optional[tuple[int, int]] = None) -> None:
        self.root = Path(root)
        self.reproducible = reproducible

    def _dir(self) -> Path:
        return private_dir(self.root)

    @contextmanager
    def locked(self) -> Iterator["DeviceState"]:
        """Hold the state folder's exclusive lock (across processes) for one plan-train-commit."""
        with open(self._dir() / ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield self
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _read(self, name: str) -> Optional[Any]:
        path = self.root / name
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None

    # -- identity and secret ---------------------------------------------------------------------------
    def secret(self) -> Secret:
        if self.reproducible is not None:
            seed, key = self.reproducible
            return Secret.from_seed(seed, f"device:{key}")
        return Secret.load_or_create(self._dir() / SECRET)

    def key(self) -> int:
        """This device's key: drawn at random (52 bits, exact as a float metric) the first time, then kept."""
        path = self.root / KEY
        if not path.exists():
            _write_atomic(self._dir() / KEY, str(secrets.randbits(52)))
        return int(path.read_text())

    # -- privacy ledger --------------------------------------------------------------------------------
    def account(self, accountant: str) -> SampleAccount:
        rec = self._read(LEDGER)
        return SampleAccount(history=_history(rec["history"]) if rec else [], accountant=accountant)

    def release(self) -> Optional[Release]:
        rec = self._read(RELEASE)
        if rec is None:
            return None
        before = rec["history_before"]
        return Release(rec["round_key"], rec["digest"], None if before is None else _history(before),
                       int(rec["index"]))

    def plan(self, this_round: str) -> Plan:
        """A request for ``this_round`` (:func:`round_key`): a replay of the last release, or a new one."""
        last = self.release()
        if last is not None and last.round_key == this_round:
            return Plan(last.index, last.history_before, last)
        return Plan(0 if last is None else last.index + 1, None, None)

    def commit(self, release: Release, account: Optional[SampleAccount], server_round: int, steps: int,
               utterances: int, seconds: float, delta: Optional[float] = None) -> None:
        """Record a release before its reply leaves: release record, ledger, round history, in that order.

        ``account`` is the ledger after this release (None without sample-level DP). A release whose
        round key is already the history's last entry (a replay) is not appended again; one whose
        earlier commit died before the history was written is.
        """
        history = self.rounds()
        first_time = not history or history[-1].get("round_key") != release.round_key
        _write_atomic(self._dir() / RELEASE, json.dumps(asdict(release)))
        if account is not None:
            _write_atomic(self.root / LEDGER, json.dumps({"history": [list(h) for h in account.history],
                                                          "accountant": account.accountant, "delta": delta}))
        if first_time:
            with open(self.root / HISTORY, "a", encoding="utf-8") as f:
                f.write(json.dumps({"round": server_round, "round_key": release.round_key, "steps": steps,
                                    "utterances": utterances, "seconds": round(seconds, 3)}) + "\n")
                f.flush()
                os.fsync(f.fileno())

    def rounds(self) -> list[dict[str, Any]]:
        """This device's training rounds, oldest first (empty if it never trained)."""
        path = self.root / HISTORY
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def rounds_trained(self) -> list[int]:
        return [r["round"] for r in self.rounds()]

    def status(self) -> dict[str, Any]:
        """What the device's owner wants to know: rounds trained, own epsilon, why it last declined."""
        rounds = self.rounds()
        rec = self._read(LEDGER) or {}
        account = SampleAccount(history=_history(rec.get("history", [])), accountant=rec.get("accountant") or "rdp")
        delta = rec.get("delta")
        return {
            "state": str(self.root), "device_key": int((self.root / KEY).read_text()) if (self.root / KEY).exists()
            else None, "rounds_trained": len(rounds), "last_round": rounds[-1] if rounds else None,
            "dp_sgd_steps": account.steps, "epsilon": account.epsilon(delta) if delta else None, "delta": delta,
            "accountant": account.accountant if delta else None, "last_declined": self._read(STATUS),
        }

    def declined(self, server_round: int, reason: str, **figures: Any) -> None:
        """Leave the device's owner a note of why it declined ``server_round``."""
        _write_atomic(self._dir() / STATUS, json.dumps({"declined_round": server_round, "reason": reason,
                                                        **figures}, indent=1))
