"""The server's private state: everything a run needs to continue after it was interrupted.

The server's state lives in ``private/`` (mode 0700, files 0600), apart from what a run publishes
(``checkpoints/round-NNN.pt``, ``results.jsonl``, ``summary.json``): the run secret
(``private/server-secret``, every DP draw of the server comes from it) and ``private/server-state.pt``
-- global model, round number, the user-level accountant's per-round (q, z) history and adaptive
clip norm, the participation ledger (rounds charged per device key), every result row so far, and
the server optimizer's moments (``server/optimizer.py``), the run nonce (128 random bits drawn once per run and sent in every train message: a device knows
a request of this run from any other run's, even from the same seed model, ``clients/state.py``).

Commit before release: after a round's aggregation the server writes its state atomically
*before* the new model goes anywhere -- to server-side evaluation, to devices for federated
evaluation, or to the published checkpoint -- and again once the round's row is measured. A round
is therefore either committed, or nothing computed from it ever left the server, and a resumed run
(``resume=true``) redoes exactly the uncommitted one (with the same devices, ``server/devices.py``,
the same cohort and the same noise streams), or only the measurement of a committed one. Devices
answer a round they already answered as ``clients/state.py`` says, so resuming never spends
privacy budget twice unnoticed; the accountant composes the recorded history, whatever the
population is when the run resumes.
"""

from __future__ import annotations

import fcntl
import os
import secrets
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from omegaconf import OmegaConf
from torch import Tensor

from fl.config import Config
from fl.privacy.randomness import Secret, private_dir

PRIVATE, STATE, SECRET = "private", "server-state.pt", "server-secret"
NOT_COMPARED = ("resume", "device", "federation.gpus_per_client")
"""Dotted config keys a resumed run may change: whether to resume, and where the models run (a run
interrupted on one machine may continue on another; the mechanism, its noise streams and its
accounting do not depend on the device). Everything else must match the interrupted run."""


@dataclass
class ServerState:
    """``round``: the last round aggregated; ``rows`` hold its row once it was measured; ``nonce``:
    the run's nonce (empty in a state written before runs had one); ``optimizer``: the server
    optimizer's state (None in a state written before it had one)."""

    round: int
    arrays: dict[str, Tensor]
    rows: list[dict[str, Any]]
    ledger: dict[str, Any]
    user: Optional[dict[str, Any]]
    config: dict[str, Any]
    nonce: str = ""
    optimizer: Optional[dict[str, Any]] = None

    @property
    def measured(self) -> bool:
        return len(self.rows) == self.round + 1


def private_path(out_dir: Path) -> Path:
    """The run's private folder (created owner-only)."""
    return private_dir(Path(out_dir) / PRIVATE)


@contextmanager
def exclusive(out_dir: Path) -> Iterator[None]:
    """Hold the run folder for one ServerApp: a second one on the same folder (a launcher resumed while
    the first still runs) fails at once instead of interleaving rounds and releases."""
    with open(private_path(out_dir) / "server.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another ServerApp is running on {out_dir}: stop it (or let it finish) before "
                               "resuming") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def state_path(out_dir: Path) -> Path:
    return Path(out_dir) / PRIVATE / STATE


def run_secret(out_dir: Path, reproducible_seed: Optional[int]) -> Secret:
    """The server's run secret: kept in ``private/server-secret`` (or derived from the seed when reproducible)."""
    if reproducible_seed is not None:
        return Secret.from_seed(reproducible_seed, "server")
    return Secret.load_or_create(private_path(out_dir) / SECRET)


def run_nonce() -> str:
    """A fresh run nonce: 128 bits from the OS CSPRNG, as hex (drawn once per run, kept in the state)."""
    return secrets.token_hex(16)


def save(out_dir: Path, state: ServerState) -> None:
    path = private_path(out_dir) / STATE
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        torch.save(state.__dict__, f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def load(out_dir: Path) -> Optional[ServerState]:
    path = state_path(out_dir)
    if not path.exists():
        return None
    return ServerState(**torch.load(path, weights_only=False))


def mismatch(saved: dict[str, Any], now: dict[str, Any], defaults: Optional[dict[str, Any]] = None) -> list[str]:
    """Dotted config keys whose values differ between the interrupted run and this one.

    A key the interrupted run's config lacks (it was saved before the key existed) matches when this
    run leaves it at its schema default in ``defaults``: that default is what the old run did."""
    out: list[str] = []

    def walk(a: Any, b: Any, default: Any, prefix: str) -> None:
        if prefix.rstrip(".") in NOT_COMPARED:
            return
        if isinstance(a, dict) and isinstance(b, dict):
            default = default if isinstance(default, dict) else {}
            for k in sorted(set(a) | set(b)):
                missing = k not in a and k in default
                walk(default[k] if missing else a.get(k), b.get(k), default.get(k), f"{prefix}{k}.")
        elif a != b:
            out.append(prefix.rstrip("."))

    walk(saved, now, defaults or {}, "")
    return out


def schema_defaults() -> dict[str, Any]:
    """Every config key at its schema default (``fl.config.Config``), as a plain dict (interpolations unresolved)."""
    return OmegaConf.to_container(OmegaConf.structured(Config), resolve=False)


def resumable(out_dir: Path, config: dict[str, Any]) -> ServerState:
    """The checkpoint to continue from; raises ``ValueError`` saying why a run cannot be resumed."""
    state = load(out_dir)
    if state is None:
        raise ValueError(f"resume=true but {state_path(out_dir)} does not exist: point hydra.run.dir at the "
                         "interrupted run's folder")
    changed = mismatch(state.config, config, schema_defaults())
    if changed:
        raise ValueError(f"resume=true but the config differs from the interrupted run's in {', '.join(changed)}")
    return state


def check_out_dir(out_dir: Path, config: dict[str, Any], resume: bool) -> None:
    """With ``resume``, ``out_dir`` must hold a checkpoint of this config; without, no run at all.

    A run never starts over an earlier one in the same folder: that would overwrite its results
    (and, in a simulation, reuse its devices' privacy ledgers). Raises ``ValueError`` saying what to do.
    """
    if resume:
        resumable(out_dir, config)
    elif state_path(out_dir).exists():
        raise ValueError(f"{out_dir} already holds a run: pass resume=true to continue it, or another hydra.run.dir")
