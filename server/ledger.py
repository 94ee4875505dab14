"""The server's participation ledger: how many rounds each device was charged, and nothing else.

A device sent a training request is charged for that round unless it validly declined: a reply
that was lost, failed or was rejected may come from a device that trained, so it counts (a
device that dropped after training has spent its budget). Devices are named by their stable keys
(``server/devices.py``), so the ledger survives a resume. The server knows all of this anyway --
it picked the cohorts -- and keeps no per-device figure a device sent (no example counts, test
metrics, timings): every epsilon it reports is computed here from the public mechanism
parameters and these counts, by the level objects that own them.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

from fl.privacy.sample import SampleLevel
from fl.privacy.user import UserLevel


class ParticipationLedger:
    def __init__(self) -> None:
        self.charged: dict[int, int] = {}

    def charge(self, devices: Iterable[int]) -> None:
        for key in devices:
            self.charged[key] = self.charged.get(key, 0) + 1

    @property
    def worst(self) -> int:
        """The most rounds any one device was charged in this run."""
        return max(self.charged.values(), default=0)

    def sample_epsilon(self, sample: Optional[SampleLevel], extra: int = 0) -> Optional[float]:
        """Largest sample-level epsilon of any device in this run (``extra`` more rounds for the worst)."""
        if sample is None:
            return None
        return sample.epsilon(self.worst + extra)

    def user_server_epsilon(self, user: Optional[UserLevel], extra: int = 0) -> Optional[float]:
        """Largest server-facing user-level epsilon of any device (local/distributed noise; else None)."""
        if user is None:
            return None
        return user.server_facing_epsilon(self.worst + extra)

    def sample_block(self, sample: Optional[SampleLevel], target: Optional[float]) -> Optional[dict[str, Any]]:
        """The summary's ``privacy.sample``: every figure needed to recompute the worst device's epsilon."""
        if sample is None:
            return None
        return {
            "noise_multiplier": sample.noise_multiplier, "max_grad_norm": sample.max_grad_norm,
            "sample_rate": sample.sample_rate, "steps_per_round": sample.steps, "max_rounds": self.worst,
            "max_steps": self.worst * sample.steps, "epsilon": sample.epsilon(self.worst), "delta": sample.delta,
            "accountant": sample.accountant, "target_epsilon": target, "secure_mode": sample.secure_mode,
            "observer": "anyone without the device's secret (the server included); per run: a deployed "
                        "device's own ledger also counts its earlier runs",
        }

    def state_dict(self) -> dict[str, Any]:
        return {"charged": dict(self.charged)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.charged = {int(k): int(v) for k, v in state["charged"].items()}
