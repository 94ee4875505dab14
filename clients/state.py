"""A device's persistent, private state: one folder, one owner, one write order.

Everything a device must remember between rounds, runs and crashes lives in its state folder and
is read and written only through :class:`DeviceState`:

* ``secret`` -- the device's 256-bit secret (``fl/privacy/randomness.py``), mode 0600: every DP draw
  of the device (DP-SGD noise, Poisson batches, user-level noise share) comes from it, so nobody
  else -- the server included -- can regenerate them. Never sent.
* ``ledger.json`` -- the DP-SGD history ``(noise_multiplier, sample_rate, steps)`` over every run:
  the device's own cumulative sample-level epsilon, held to its budget (``DevicePolicy``).
* ``server-ledger.json`` -- the server-facing user-level history, one ``(z_update, noise_cohort)``
  per user-level release over every run: what servers learned about this device
  (:func:`fl.privacy.user.server_facing_epsilon`: Gaussian(z / 2) per noised release, no
  amplification, composed), held to its budget. Central releases (cohort 0: a clear update to a
  server the owner chose to trust) are counted apart: no guarantee holds against that server.
* ``release.json`` -- the last training release: the request it answered (:func:`round_key`: round
  number, the run's nonce and SHA-256 of the global model), a digest of the reply, both ledgers
  before it, its release index and whether it may be replayed. Every new release takes the next
  index, and the index names the secret streams it draws from, so no two different releases ever
  share noise. A request is the same request only within one run: the nonce the server draws per
  run makes another run from the same seed model a new request. A request asked again (a resumed
  server) is answered as :meth:`DeviceState.plan` says, by where the noise is added:

  - sample-level only, central, local: trained again from the same ledgers with the same index, it
    gives the same bits -- sending them again reveals nothing new, and it counts once; if the reply
    would differ, the device declines and its first release stays counted;
  - distributed (the noise split across devices, ``noise_cohort > 1``): never the same bits twice.
    The server sees only sums; if two attempts' contributor sets differ, the difference of two sums
    built on replayed shares is one device's update with noise z C / sqrt(t). A repeat takes a new
    index (fresh noise at both levels) and is charged as a new release in both ledgers.
* ``rounds.jsonl`` -- the releases this device made (round, its key, release index, steps, utterances held, seconds):
  for the device's owner, and for a simulation's audit and benchmark. Never sent.
* ``status.json`` -- why the device last declined (reason and code), for its owner.
* ``policy.json`` -- the device's own policy as ``unheard-device`` last started it, for its owner.
* ``device-key`` -- a deployed device's random 52-bit name (``key``), the one value it sends about itself.

Write order (:meth:`DeviceState.commit`), all before the reply leaves: release record, then
ledger, then server-facing ledger, then round history. A training request holds the folder's lock
(:meth:`DeviceState.locked`) from planning to commit, so two runs using one device never
interleave their ledger updates. A crash between any two leaves a release record of a reply that
was never sent: asked again, the device trains from the recorded ledgers-before and counts the
request once (under distributed noise it makes a fresh release from the current ledgers, which
may then count the unsent one too); never asked again, nothing was released. Every reply that
left the device is counted in its ledgers, exactly once where it may be replayed: a crash can
only make them count more, never less.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import secrets
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from flwr.app import ArrayRecord, MetricRecord

from fl.privacy.randomness import Secret, private_dir
from fl.privacy.sample import History, SampleAccount
from fl.privacy.user import server_facing_epsilon

SECRET, LEDGER, RELEASE, HISTORY, STATUS, KEY = (
    "secret", "ledger.json", "release.json", "rounds.jsonl", "status.json", "device-key")
SERVER_LEDGER, POLICY = "server-ledger.json", "policy.json"

ServerHistory = list[tuple[float, int]]
"""``(z_update, noise_cohort)`` of every user-level release (cohort 0: central, a clear update)."""


@dataclass
class ServerAccount:
    """What servers learned about this device from its user-level releases, over every run.

    Local (cohort 1) and distributed (cohort >= 2) releases carry noise of std >= z C on whatever the
    server can see: their epsilon is :func:`~fl.privacy.user.server_facing_epsilon`, the formula of
    the server's own report. Central releases (cohort 0) are counted in ``clear``: the owner opted
    into trusting that server, and no guarantee holds against it."""

    history: ServerHistory = field(default_factory=list)
    accountant: str = "pld"

    @property
    def noised(self) -> list[float]:
        return [z for z, cohort in self.history if cohort >= 1]

    @property
    def clear(self) -> int:
        return sum(1 for _, cohort in self.history if cohort < 1)

    def epsilon(self, delta: float) -> float:
        """Epsilon at ``delta`` of every noised release recorded (0.0 before any)."""
        return server_facing_epsilon(self.noised, delta, self.accountant)

    def plus(self, z: float, cohort: int) -> "ServerAccount":
        """This history with one more release appended (a copy)."""
        return ServerAccount(history=[*self.history, (float(z), int(cohort))], accountant=self.accountant)


@dataclass(frozen=True)
class Release:
    """The device's last training reply: which request, its digest, both ledgers before it, its
    index, and whether a repeat of the request may be answered with the same bits (not under
    distributed noise)."""

    round_key: str
    digest: str
    history_before: Optional[History]
    index: int
    server_before: Optional[ServerHistory] = None
    replayable: bool = True


@dataclass(frozen=True)
class Plan:
    """How to answer one train request: the release ``index`` (names the secret streams), the
    ledgers to train from (None: the current ones), and the earlier release this one must
    reproduce (None for a new release)."""

    index: int
    history: Optional[History]
    replaying: Optional[Release]
    server_history: Optional[ServerHistory] = None


def _hash(arrays: ArrayRecord) -> "hashlib._Hash":
    h = hashlib.sha256()
    for name, array in arrays.items():
        h.update(name.encode())
        h.update(array.data)
    return h


def round_key(server_round: int, arrays: ArrayRecord, nonce: str = "") -> str:
    """A request's identity: the round number, the run's nonce and a SHA-256 of the global model sent."""
    return f"{server_round}:{nonce}:{_hash(arrays).hexdigest()}"


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


def _server_history(raw: Any) -> ServerHistory:
    return [(float(z), int(cohort)) for z, cohort in raw]


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

    def server_account(self, accountant: str = "pld") -> ServerAccount:
        """The server-facing user-level ledger (empty if the device never made a user-level release)."""
        rec = self._read(SERVER_LEDGER)
        return ServerAccount(history=_server_history(rec["history"]) if rec else [], accountant=accountant)

    def release(self) -> Optional[Release]:
        rec = self._read(RELEASE)
        if rec is None:
            return None
        before, server = rec["history_before"], rec.get("server_before")
        return Release(rec["round_key"], rec["digest"], None if before is None else _history(before),
                       int(rec["index"]), None if server is None else _server_history(server),
                       bool(rec.get("replayable", True)))

    def plan(self, this_round: str, fresh: bool = False) -> Plan:
        """A request for ``this_round`` (:func:`round_key`): a replay of the last release, or a new one.

        ``fresh`` (distributed noise): never a replay -- a repeat of the last request is a new release
        with the next index, trained from the current ledgers (see the module doc)."""
        last = self.release()
        if not fresh and last is not None and last.replayable and last.round_key == this_round:
            return Plan(last.index, last.history_before, last, last.server_before)
        return Plan(0 if last is None else last.index + 1, None, None)

    def commit(self, release: Release, account: Optional[SampleAccount], server_round: int, steps: int,
               utterances: int, seconds: float, delta: Optional[float] = None,
               server: Optional[ServerAccount] = None, server_delta: Optional[float] = None) -> None:
        """Record a release before its reply leaves: release record, ledger, server-facing ledger,
        round history, in that order.

        ``account`` is the ledger after this release (None without sample-level DP), ``server`` the
        server-facing ledger after it (None without user-level DP). A release whose index is already
        the history's last entry (a replay) is not appended again; one whose earlier commit died
        before the history was written is.
        """
        history = self.rounds()
        last = history[-1] if history else None
        first_time = last is None or (last["release"] != release.index if "release" in last
                                      else last.get("round_key") != release.round_key)
        _write_atomic(self._dir() / RELEASE, json.dumps(asdict(release)))
        if account is not None:
            _write_atomic(self.root / LEDGER, json.dumps({"history": [list(h) for h in account.history],
                                                          "accountant": account.accountant, "delta": delta}))
        if server is not None:
            _write_atomic(self.root / SERVER_LEDGER, json.dumps({
                "history": [list(h) for h in server.history], "accountant": server.accountant,
                "delta": server_delta}))
        if first_time:
            with open(self.root / HISTORY, "a", encoding="utf-8") as f:
                f.write(json.dumps({"round": server_round, "round_key": release.round_key, "release": release.index,
                                    "steps": steps, "utterances": utterances, "seconds": round(seconds, 3)}) + "\n")
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
        """What the device's owner wants to know: rounds trained, both ledgers' epsilons, its policy,
        why it last declined."""
        rounds = self.rounds()
        rec = self._read(LEDGER) or {}
        account = SampleAccount(history=_history(rec.get("history", [])), accountant=rec.get("accountant") or "rdp")
        delta = rec.get("delta")
        srec = self._read(SERVER_LEDGER) or {}
        server = ServerAccount(history=_server_history(srec.get("history", [])),
                               accountant=srec.get("accountant") or "pld")
        sdelta = srec.get("delta")
        return {
            "state": str(self.root), "device_key": int((self.root / KEY).read_text()) if (self.root / KEY).exists()
            else None, "rounds_trained": len(rounds), "last_round": rounds[-1] if rounds else None,
            "dp_sgd_steps": account.steps, "epsilon": account.epsilon(delta) if delta else None, "delta": delta,
            "accountant": account.accountant if delta else None,
            "server_releases": len(server.noised), "clear_updates": server.clear,
            "server_epsilon": server.epsilon(sdelta) if sdelta else None, "server_delta": sdelta,
            "server_accountant": server.accountant if sdelta else None,
            "policy": self._read(POLICY), "last_declined": self._read(STATUS),
        }

    def record_policy(self, policy: dict[str, Any]) -> None:
        """Note the device's own policy for its owner (``unheard-device`` does at every start)."""
        _write_atomic(self._dir() / POLICY, json.dumps(policy, indent=1))

    def declined(self, server_round: int, reason: str, **figures: Any) -> None:
        """Leave the device's owner a note of why it declined ``server_round``."""
        _write_atomic(self._dir() / STATUS, json.dumps({"declined_round": server_round, "reason": reason,
                                                        **figures}, indent=1))
