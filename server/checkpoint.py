"""The server's checkpoint: everything a run needs to continue after it was interrupted.

After every round the server writes ``checkpoints/server-state.pt`` atomically -- global model,
round number, the cohort sampler's RNG state, the user-level accountant and noise generator, the
sample-level ledger and every result row so far -- *before* it publishes that round (its model
checkpoint and results row). A round is therefore either committed, or it never left the server,
and a resumed run (``resume=true``) redoes exactly the uncommitted one: with the same devices
(``server/devices.py``), the same cohort and the same noise, it ends with the results an
uninterrupted run would have. Devices answer a round they already answered as
``clients/replay.py`` says, so resuming never spends privacy budget twice unnoticed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

STATE = "server-state.pt"
NOT_COMPARED = ("resume",)
"""Config keys a resumed run may change: everything else must match the interrupted run."""


@dataclass
class ServerState:
    round: int
    arrays: dict[str, Tensor]
    rng: tuple
    rows: list[dict[str, Any]]
    sample: dict[str, Any]
    user: Optional[dict[str, Any]]
    config: dict[str, Any]


def state_path(out_dir: Path) -> Path:
    return Path(out_dir) / "checkpoints" / STATE


def save(out_dir: Path, state: ServerState) -> None:
    path = state_path(out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state.__dict__, tmp)
    tmp.replace(path)


def load(out_dir: Path) -> Optional[ServerState]:
    path = state_path(out_dir)
    if not path.exists():
        return None
    return ServerState(**torch.load(path, weights_only=False))


def mismatch(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Dotted config keys whose values differ between the interrupted run and this one."""
    out: list[str] = []

    def walk(a: Any, b: Any, prefix: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                if not prefix and k in NOT_COMPARED:
                    continue
                walk(a.get(k), b.get(k), f"{prefix}{k}.")
        elif a != b:
            out.append(prefix.rstrip("."))

    walk(saved, now, "")
    return out


def resumable(out_dir: Path, config: dict[str, Any]) -> ServerState:
    """The checkpoint to continue from; raises ``ValueError`` saying why a run cannot be resumed."""
    state = load(out_dir)
    if state is None:
        raise ValueError(f"resume=true but {state_path(out_dir)} does not exist: point hydra.run.dir at the "
                         "interrupted run's folder")
    changed = mismatch(state.config, config)
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
