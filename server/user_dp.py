"""Server side of user-level (device-level) DP-FedAvg, and its accountant.

Guarantee: with ``noise=central`` and a trusted server, ``noise=local`` without trusting it, or
``noise=distributed`` with an honest-but-curious server under secure aggregation (``server/secure_round.py``),
the sequence of global models is (epsilon, delta)-DP with respect to adding or removing all the
data of any one device (zero-out neighbours), where epsilon composes over the rounds run a
subsampled Gaussian mechanism with noise multiplier z and rate q = expected cohort / devices,
accounted by Google's dp-accounting (PLD or RDP). This holds because
  * each device's update is clipped to L2 norm C on the device (``fl/privacy/update.py``),
  * the noised sum is divided by a public constant (the expected cohort), never by the number
    of replies or by example counts, so one device moves the average by at most C / cohort,
  * Gaussian noise of std z*C is on the sum, and a round with no replies still adds it,
  * devices are Poisson-sampled. With ``fixed`` sampling no amplification is claimed (q = 1).
Adaptive clipping spends part of the same budget on the noised count of clip bits; updates then
get the smaller ``effective_noise_multiplier`` and the accountant uses the total z.
With ``population``/``cohort`` set, q and the noise describe that stated deployment, not the
simulation, and the report says ``extrapolated``.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from fl import protocol as P
from fl.config import UserPrivacyConfig
from fl.privacy.accounting import UserLevelSpec, calibrate_noise_multiplier, extrapolate, user_level_epsilon
from fl.privacy.user import AdaptiveClipNorm, gaussian_noise_like, server_noise_std

log = logging.getLogger(__name__)


class UserLevelDP:
    def __init__(self, cfg: UserPrivacyConfig, devices: int, expected_cohort: int, sampling: str,
                 planned_rounds: int, seed: int) -> None:
        if cfg.noise not in ("central", "local", "distributed"):
            raise ValueError(f"privacy.user.noise={cfg.noise!r}: expected central, local or distributed")
        if cfg.noise == "distributed" and (cfg.population is not None or cfg.secure_threshold < 3):
            raise ValueError("privacy.user.noise=distributed needs secure_threshold >= 3 and no extrapolation "
                             "(population/cohort): the simulated sum must carry the accounted noise")
        if cfg.clipping == "adaptive" and cfg.noise != "central":
            raise ValueError("privacy.user.clipping=adaptive is supported with noise=central only")
        if (cfg.population is None) != (cfg.cohort is None):
            raise ValueError("privacy.user.population and privacy.user.cohort go together (extrapolation)")
        self.cfg = cfg
        self.sampling = sampling
        self.extrapolated = cfg.population is not None
        self.population = cfg.population if self.extrapolated else devices
        self.accounted_cohort = cfg.cohort if self.extrapolated else expected_cohort
        self.sim_cohort = expected_cohort
        self.rate = extrapolate(self.population, self.accounted_cohort)  # type: ignore[arg-type]
        self.z = cfg.noise_multiplier
        if cfg.target_epsilon is not None:
            self.z = calibrate_noise_multiplier(cfg.target_epsilon, self.rate, planned_rounds, cfg.delta,
                                                sampling, cfg.accountant)
            log.info("user-level noise multiplier %.4f for epsilon %.3g over %d rounds", self.z,
                     cfg.target_epsilon, planned_rounds)
        self.adaptive = (AdaptiveClipNorm(cfg.clipping_norm, cfg.target_quantile, cfg.clip_learning_rate,
                                          cfg.count_noise_multiplier) if cfg.clipping == "adaptive" else None)
        self.z_update = self.adaptive.effective_noise_multiplier(self.z) if self.adaptive else self.z
        self.rounds = 0
        self.generator = torch.Generator().manual_seed(seed + 7919)

    @property
    def secure(self) -> bool:
        """Distributed noise: updates are summed by secure aggregation, never seen one by one."""
        return self.cfg.noise == "distributed"

    @property
    def clip_norm(self) -> float:
        return self.adaptive.clip_norm if self.adaptive else self.cfg.clipping_norm

    def device_config(self) -> dict[str, Any]:
        """What devices need for their part: the current clip norm and the cohort sharing the noise.

        Under distributed noise the cohort sharing it is the secure-aggregation threshold: any sum
        the server can decode covers at least that many devices, so it carries noise std >= z*C.
        """
        cohort = self.cfg.secure_threshold if self.secure else self.sim_cohort
        return {P.CLIP_NORM: self.clip_norm, P.NOISE_COHORT: cohort}

    def spec(self, rounds: int) -> UserLevelSpec:
        return UserLevelSpec(noise_multiplier=self.z, sampling_rate=self.rate, rounds=rounds, delta=self.cfg.delta,
                             sampling=self.sampling, accountant=self.cfg.accountant)

    def epsilon(self, rounds: Optional[int] = None) -> float:
        return user_level_epsilon(self.spec(self.rounds if rounds is None else rounds))

    def aggregate(self, updates: list[Mapping[str, Tensor]], reference: Mapping[str, Tensor],
                  clip_bits: list[float]) -> dict[str, Tensor]:
        """The private average update of one round (a round with no update still releases noise)."""
        total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in reference.items() if v.is_floating_point()}
        for u in updates:
            for k in total:
                total[k] += u[k].to(torch.float64)
        # noise on the sum, scaled so the simulated average has the deployment's noise when extrapolated
        std = server_noise_std(self.cfg.noise, self.z_update, self.clip_norm) * self.sim_cohort / self.accounted_cohort
        if std > 0:
            noise = gaussian_noise_like(total, std, self.generator)
            total = {k: v + noise[k] for k, v in total.items()}
        if self.adaptive:
            self.adaptive.update(sum(clip_bits), self.sim_cohort, self.generator, noise=self.cfg.noise,
                                 reports=len(clip_bits))
        self.rounds += 1
        return {k: (v / self.sim_cohort).to(reference[k].dtype) for k, v in total.items()}

    def state_dict(self) -> dict[str, Any]:
        """What changes round to round: rounds accounted, the noise generator, the adaptive clip norm."""
        return {"rounds": self.rounds, "generator": self.generator.get_state(),
                "clip_norm": self.adaptive.clip_norm if self.adaptive else None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.rounds = int(state["rounds"])
        self.generator.set_state(state["generator"])
        if self.adaptive:
            self.adaptive.clip_norm = float(state["clip_norm"])

    def block(self) -> dict[str, Any]:
        """The summary's ``privacy.user``: every figure needed to recompute epsilon."""
        return {
            "noise": self.cfg.noise, "noise_multiplier": self.z, "update_noise_multiplier": self.z_update,
            "clipping": self.cfg.clipping, "clipping_norm": self.clip_norm,
            "initial_clipping_norm": self.cfg.clipping_norm, "sampling": self.sampling,
            "sampling_rate": self.rate, "amplification": self.sampling == "poisson", "rounds": self.rounds,
            "population": self.population, "cohort": self.accounted_cohort, "extrapolated": self.extrapolated,
            "epsilon": self.epsilon(), "delta": self.cfg.delta, "accountant": self.cfg.accountant,
        }
