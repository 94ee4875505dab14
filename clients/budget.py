"""A device's sample-level privacy ledger: a file on the device that survives rounds, crashes and restarts.

The ledger is the device's DP-SGD history ``(noise_multiplier, sample_rate, steps)``; from it the
device computes its cumulative epsilon, decides the noise in ``target_epsilon`` mode once and for
all, and refuses a round that would take it past ``max_epsilon``. It is written (atomically)
right after training and before the device replies, so a reply that is lost -- or a process that
dies -- never loses spend. (Flower's ``context.state`` would not do: it is dropped when a
ClientApp call fails.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from fl.config import SamplePrivacyConfig
from fl.privacy.accounting import sample_level_noise_multiplier
from fl.privacy.sample import SampleAccount

LEDGER = "ledger.json"
"""The ledger's file name in a device's state folder."""


def _read(path: Path) -> Optional[dict]:
    return json.loads(path.read_text()) if path.exists() else None


def load_account(path: Path, accountant: str) -> SampleAccount:
    rec = _read(path)
    if rec is None:
        return SampleAccount(accountant=accountant)
    return SampleAccount(history=[(float(z), float(q), int(n)) for z, q, n in rec["history"]], accountant=accountant)


def save_account(path: Path, account: SampleAccount, noise_multiplier: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"history": [list(h) for h in account.history], "noise_multiplier": noise_multiplier}))
    tmp.replace(path)


def noise_multiplier(path: Path, cfg: SamplePrivacyConfig, rate: float, local_steps: int,
                     planned_rounds: int, participation: float) -> float:
    """The device's DP-SGD noise: fixed by config, or derived once from ``target_epsilon``.

    In target mode the device plans for ``planned_rounds * participation`` rounds of
    ``local_steps`` steps (its expected share of the run); the first value it derives is kept, so
    the noise never changes mid-run. ``max_epsilon`` is what stops a device that is sampled more
    often than expected.
    """
    if cfg.target_epsilon is None:
        return cfg.noise_multiplier
    rec = _read(path)
    if rec is not None:
        return float(rec["noise_multiplier"])
    expected_rounds = max(1, round(planned_rounds * participation))
    return sample_level_noise_multiplier(cfg.target_epsilon, cfg.delta, rate, local_steps * expected_rounds,
                                         cfg.accountant)


def would_exceed(account: SampleAccount, cfg: SamplePrivacyConfig, sigma: float, rate: float, steps: int) -> bool:
    """True if ``steps`` more DP-SGD steps would take this device past its ``max_epsilon``."""
    if cfg.max_epsilon is None:
        return False
    trial = SampleAccount(history=account.history + [(sigma, rate, steps)], accountant=account.accountant)
    return trial.epsilon(cfg.delta) > cfg.max_epsilon


STATUS = "status.json"


def record_budget_spent(state_dir: Path, epsilon: float, cfg: SamplePrivacyConfig, server_round: int) -> None:
    """Leave the device's owner a note that training stopped because the budget is spent."""
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / STATUS).write_text(json.dumps({
        "training": "stopped: privacy budget spent", "epsilon": epsilon, "delta": cfg.delta,
        "max_epsilon": cfg.max_epsilon, "declined_round": server_round}, indent=1))
