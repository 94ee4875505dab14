"""The server's participation ledger: how many rounds each device was charged, and nothing else.

A device sent a training request is charged for that round unless it validly declined: a reply
that was lost, failed or was rejected may come from a device that trained, so it counts (a
device that dropped after training has spent its budget). Devices are named by their stable keys
(``server/devices.py``), so the ledger survives a resume. The server knows all of this anyway --
it picked the cohorts -- and keeps no per-device figure a device sent (no example counts, test
metrics, timings): every epsilon it reports is computed here from the public mechanism
parameters, by the level objects that own them, for a device charged in *every* round run
(``rounds``). That is a bound whatever the secret cohorts and the devices' declines were, and it
depends on nothing but the number of rounds: the most rounds any real device was charged
(``worst``) depends on who was sampled and who declined, so it is kept for the experimenter's
private summary only.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

from fl.privacy.sample import SampleLevel
from fl.privacy.user import UserLevel


SAMPLE_OBSERVERS = {
    "device": "anyone without the device's secret (the server included)",
    "central": "anyone who sees the global models (the server, which adds the noise, sees clipped sums in clear)",
    "distributed": "anyone without the device's secret, the server included (honest-but-curious, SecAgg+ sums of "
                   ">= noise_cohort devices)",
}


class ParticipationLedger:
    def __init__(self) -> None:
        self.charged: dict[int, int] = {}
        self.rounds = 0
        """Charges made (one a round, plus a resumed distributed round's second attempt): the most
        rounds a device can have been charged."""

    def charge(self, devices: Iterable[int]) -> None:
        self.rounds += 1
        for key in devices:
            self.charged[key] = self.charged.get(key, 0) + 1

    @property
    def worst(self) -> int:
        """The most rounds any one device was charged in this run (private: it depends on the cohorts)."""
        return max(self.charged.values(), default=0)

    def sample_epsilon(self, sample: Optional[SampleLevel], extra: int = 0) -> Optional[float]:
        """Sample-level epsilon of a device charged in every round (``extra`` more): a bound for every device."""
        if sample is None:
            return None
        return sample.epsilon(self.rounds + extra)

    def user_server_epsilon(self, user: Optional[UserLevel], extra: int = 0) -> Optional[float]:
        """Server-facing user-level epsilon of a device charged in every round (local/distributed; else None)."""
        if user is None:
            return None
        return user.server_facing_epsilon(self.rounds + extra)

    def sample_block(self, sample: Optional[SampleLevel], target: Optional[float]) -> Optional[dict[str, Any]]:
        """The summary's ``privacy.sample``: every figure needed to recompute the published epsilon,
        that of a device charged in every round (``max_rounds``)."""
        if sample is None:
            return None
        return {
            "noise_multiplier": sample.noise_multiplier, "max_grad_norm": sample.max_grad_norm,
            "sample_rate": sample.sample_rate, "steps_per_round": sample.steps, "max_rounds": self.rounds,
            "max_steps": self.rounds * sample.steps, "epsilon": sample.epsilon(self.rounds), "delta": sample.delta,
            "accountant": sample.accountant, "epsilon_rdp": sample.epsilon(self.rounds, "rdp"),
            "target_epsilon": target, "secure_mode": sample.secure_mode, "noise": sample.noise,
            "expected_batch": sample.expected_batch if sample.aggregated else None,
            "noise_cohort": sample.noise_cohort if sample.noise == "distributed" else None,
            "device_sampling_credit": False,
            "observer": SAMPLE_OBSERVERS[sample.noise] + "; per run: a deployed device's own ledger also counts its "
                        "earlier runs",
        }

    def state_dict(self) -> dict[str, Any]:
        return {"charged": dict(self.charged), "rounds": self.rounds}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.charged = {int(k): int(v) for k, v in state["charged"].items()}
        self.rounds = int(state.get("rounds", max(self.charged.values(), default=0)))  # older states: the worst
