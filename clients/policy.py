"""A device sets its own floor: every train request is checked against the device's policy before it trains.

The server announces the mechanism in every train message (``SampleLevel``, ``UserRound``) and the
device applies exactly it -- but only after checking it against its own
:class:`~fl.config.DevicePolicy`, which no server can set (a deployed device's comes from its own
node config, ``clients/device_app.py``):

1. placement (:data:`~fl.protocol.DECLINED_PLACEMENT`): user-level and sample-level noise must be
   placed where the policy allows (``allowed_user_noise``, ``allowed_sample_noise``); ``central``
   means the device sends its clipped update (or clipped gradient sum) in clear to a server it must
   trust, and a noise share split across devices is refused outside secure aggregation;
2. floors (:data:`~fl.protocol.DECLINED_NOISE_FLOOR`): DP-SGD's z >= ``min_sample_z``, and z >=
   ``min_user_z`` for user-level noise the device adds itself (local, distributed); a request with
   no DP at all is below every floor unless both are 0;
3. budgets: the device's sample-level ledger after this release within the stricter of its
   ``max_sample_epsilon`` and the run's ``privacy.sample.max_epsilon``
   (:data:`~fl.protocol.DECLINED_SAMPLE_BUDGET`), and its server-facing user-level ledger after
   this release within ``max_server_epsilon`` (:data:`~fl.protocol.DECLINED_SERVER_BUDGET`), both
   over every run the device ever took part in (``clients/state.py``).

A declined request trains nothing and changes no ledger: the device replies with ``declined`` set
to the code (nothing else) and leaves its owner a note (``status.json``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from clients.state import ServerAccount
from fl import protocol as P
from fl.config import DevicePolicy
from fl.privacy.sample import SampleAccount, SampleLevel
from fl.privacy.user import UserRound


@dataclass(frozen=True)
class Refusal:
    """Why a request is declined: its ``code`` (the only thing sent), a note for the owner and the figures."""

    code: int
    note: str
    figures: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.code not in P.DECLINE_REASONS:
            raise ValueError(f"decline code {self.code!r} is not in fl.protocol.DECLINE_REASONS")

    @property
    def reason(self) -> str:
        return P.DECLINE_REASONS[self.code]


def placement(user: Optional[UserRound]) -> Optional[str]:
    """Where a round's user-level noise is added (None: no user-level DP)."""
    if user is None:
        return None
    return {0: "central", 1: "local"}.get(user.noise_cohort, "distributed")


def check_mechanism(policy: DevicePolicy, sample: Optional[SampleLevel], user: Optional[UserRound],
                    secure: bool = False) -> Optional[Refusal]:
    """Placement and floors: what the request asks for, against the policy (None: acceptable).

    ``secure``: this device's replies go through SecAgg+ (its app was built with the secure mods,
    which answer nothing outside the protocol and refuse a noise cohort above the threshold they
    enforce). Noise split across devices (cohort t > 1) is refused without it: the server would see
    this device's update with 1/t of the noise variance. Adaptive clipping's clip bit leaves in
    clear, so it is refused unless the placement is central (a server the device trusts anyway).
    """
    if sample is not None and sample.noise not in policy.allowed_sample_noise:
        return Refusal(P.DECLINED_PLACEMENT, f"sample-level noise={sample.noise} is not among this device's allowed "
                       f"placements {list(policy.allowed_sample_noise)}", {"sample_placement": sample.noise})
    if sample is not None and sample.noise == "distributed" and not secure:
        return Refusal(P.DECLINED_PLACEMENT, f"a DP-FedSGD noise share of 1/{sample.noise_cohort} asked outside secure "
                       "aggregation: the server would see this sum with less than its accounted noise",
                       {"sample_placement": sample.noise, "noise_cohort": sample.noise_cohort})
    where = placement(user)
    if where is not None and where not in policy.allowed_user_noise:
        return Refusal(P.DECLINED_PLACEMENT, f"user-level noise={where} is not among this device's allowed placements "
                       f"{list(policy.allowed_user_noise)}", {"placement": where})
    if where == "distributed" and not secure:
        return Refusal(P.DECLINED_PLACEMENT, f"a noise share of 1/{user.noise_cohort} asked outside secure "  # type: ignore[union-attr]
                       "aggregation: the server would see this update with less than its accounted noise",
                       {"placement": where, "noise_cohort": user.noise_cohort})  # type: ignore[union-attr]
    if user is not None and user.clipping == "adaptive" and where != "central":
        return Refusal(P.DECLINED_PLACEMENT, f"adaptive clipping with noise={where}: its clip bit would leave in "
                       "clear, un-noised", {"placement": where, "clipping": "adaptive"})
    if sample is None and user is None and (policy.min_sample_z > 0 or policy.min_user_z > 0):
        return Refusal(P.DECLINED_NOISE_FLOOR, "the run asks for no differential privacy at all: the update would "
                       "leave in clear", {"min_sample_z": policy.min_sample_z, "min_user_z": policy.min_user_z})
    if sample is not None and not sample.noise_multiplier >= policy.min_sample_z:
        return Refusal(P.DECLINED_NOISE_FLOOR, f"DP-SGD noise multiplier {sample.noise_multiplier:g} is below this "
                       f"device's floor {policy.min_sample_z:g}",
                       {"sample_z": sample.noise_multiplier, "min_sample_z": policy.min_sample_z})
    if user is not None and where != "central" and not user.noise_multiplier >= policy.min_user_z:
        return Refusal(P.DECLINED_NOISE_FLOOR, f"user-level noise multiplier {user.noise_multiplier:g} is below this "
                       f"device's floor {policy.min_user_z:g}",
                       {"user_z": user.noise_multiplier, "min_user_z": policy.min_user_z})
    return None


def sample_budget(policy: DevicePolicy, run_cap: Optional[float]) -> Optional[float]:
    """The device's sample-level budget: the stricter of its own and the one the run asks for."""
    caps = [c for c in (policy.max_sample_epsilon, run_cap) if c is not None]
    return min(caps) if caps else None


def check_budgets(policy: DevicePolicy, sample: Optional[SampleLevel], account: Optional[SampleAccount],
                  run_cap: Optional[float], user: Optional[UserRound], server: Optional[ServerAccount],
                  server_delta: float) -> Optional[Refusal]:
    """Both ledgers after this release (``account``, ``server``: before it), against the budgets."""
    budget = sample_budget(policy, run_cap)
    if sample is not None and account is not None and budget is not None:
        after = account.plus(sample.noise_multiplier, sample.sample_rate, sample.steps).epsilon(sample.delta)
        if not after <= budget:
            spent = account.epsilon(sample.delta)
            return Refusal(P.DECLINED_SAMPLE_BUDGET, f"this round would take the sample-level epsilon from "
                           f"{spent:.3f} to {after:.3f} > its budget {budget:g}",
                           {"epsilon": spent, "delta": sample.delta, "max_epsilon": budget})
    limit = policy.max_server_epsilon
    if user is not None and server is not None and placement(user) != "central" and limit is not None:
        after = server.plus(user.noise_multiplier, user.noise_cohort).epsilon(server_delta)
        if not after <= limit:
            spent = server.epsilon(server_delta)
            return Refusal(P.DECLINED_SERVER_BUDGET, f"this round would take the server-facing user-level epsilon "
                           f"from {spent:.3f} to {after:.3f} > its budget {limit:g}",
                           {"epsilon": spent, "delta": server_delta, "max_epsilon": limit})
    return None
