"""User-level (device-level) differential privacy: the mechanisms of DP-FedAvg.

Guarantee. One round of DP-FedAvg releases the noised sum of the cohort's bounded contributions

    S = sum_{i in cohort} clip(Delta_i, C) + N(0, (z C)^2 I),

(the caller divides S by a public constant, such as the expected cohort size, never by a data-
dependent count). Each device's contribution has L2 norm <= C (``clip_update`` / ``per_layer_clip``
in ``fl/privacy/gaussian.py`` ensure it exactly, float error included; updates are summed
unweighted), so adding or removing
one device -- or zeroing out its contribution -- moves S by at most C in L2: one round is the
Gaussian mechanism with noise multiplier z with respect to a device's whole data set. Over rounds
it composes as accounted in ``fl.privacy.accounting`` (subsampled Gaussian only if the cohort is
really Poisson-sampled). Everything a device sends must go through these mechanisms: a device whose
update is released unclipped or unnoised voids the guarantee for everyone in the round.

Noise placement changes whom a device must trust, not the guarantee of the released sum:
  * ``central``: devices send clipped, un-noised updates; the server adds N(0, (zC)^2) to the sum.
    Devices trust the server (the guarantee holds for everything released after aggregation).
  * ``local``: each device adds N(0, (zC)^2) itself, so each single update is already z-Gaussian
    against anyone who sees it (the server included); the sum is sqrt(cohort) times noisier.
  * ``distributed``: each device adds N(0, (zC)^2 / cohort); with secure aggregation only the sum
    is seen, and its noise has std zC -- provided at least ``cohort`` devices add their share. If
    devices drop out the noise shrinks, so pass the minimum number of devices that will survive.

Whom each placement protects against is reported separately (``UserLevel.block``): the
epsilon of the released models (amplified by Poisson sampling of devices), and for ``local`` and
``distributed`` also what the *server* learns about a device, which it picks for the cohort and
sees reply: no amplification, replace-one sensitivity 2C, composed over the rounds that device
trained in (``server_facing_epsilon``).

Every noise draw comes from a secret stream (``fl/privacy/randomness.py``): the server's for
central noise and the adaptive-clipping count, each device's own for its share. Floating-point
noise samples leak through their low-order bits (Mironov 2012; Holohan & Braghin 2021);
``secure_mode`` draws them with Opacus' mitigation.

One owner: :class:`UserLevel` (server half: parameters, re-clipping, noise, accountant) hands
devices a :class:`UserRound` (device half: clip, noise share) in every train message; devices
apply exactly it and echo it back, and the server refuses a reply that used anything else.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor

from fl import protocol
from fl.config import USER_NOISE_PLACEMENTS, UserPrivacyConfig
from fl.privacy.accounting import (
    UserLevelSpec,
    calibrate_noise_multiplier,
    composed_epsilon,
    extrapolate,
)
from fl.privacy.gaussian import (
    AdaptiveClipNorm,
    check_int,
    check_nonnegative,
    check_positive,
    clip_update,
    gaussian_noise_like,
    noise_norm_bound,
    per_layer_clip,
    update_norm,
)
from fl.privacy.randomness import CLIP_COUNT, SERVER_NOISE, USER_NOISE, Secret

log = logging.getLogger(__name__)

CLIPPINGS: tuple[str, ...] = ("fixed", "adaptive", "per_layer")
# train-message config keys (server -> device) and echo metric keys (device -> server)
WIRE_Z, WIRE_C, WIRE_COHORT, WIRE_CLIPPING = "user-z", "user-c", "user-noise-cohort", "user-clipping"


@dataclass(frozen=True)
class UserRound:
    """One round of the user-level mechanism as a device applies it (the device's half).

    ``noise_multiplier`` z of the updates' noise, ``clip_norm`` C, ``noise_cohort`` how many
    devices share the noise on the sum (0: the server adds all of it, ``central``; 1: each device
    adds all of it, ``local``; t: each adds 1/t of its variance and secure aggregation decodes only
    sums of >= t devices, ``distributed``), ``clipping`` (flat ``fixed``, flat plus the clip bit
    ``adaptive``, or ``per_layer``). ``secure_mode`` is the device's own noise-sampling choice.
    Guarantee: :meth:`privatize` returns an update of L2 norm <= C plus the device's share, drawn
    from its secret stream for this release.
    """

    noise_multiplier: float
    clip_norm: float
    noise_cohort: int
    clipping: str = "fixed"
    secure_mode: bool = False

    def __post_init__(self) -> None:
        check_nonnegative("user-level noise multiplier", self.noise_multiplier)
        check_positive("user-level clip norm", self.clip_norm)
        check_int("noise cohort", self.noise_cohort, 0)
        if self.clipping not in CLIPPINGS:
            raise ValueError(f"clipping must be one of {CLIPPINGS}, got {self.clipping!r}")

    @property
    def device_std(self) -> float:
        """Std of the noise this device adds to each coordinate of its clipped update."""
        if self.noise_cohort == 0:
            return 0.0
        return self.noise_multiplier * self.clip_norm / math.sqrt(self.noise_cohort)

    def to_config(self) -> dict[str, float | int]:
        return {WIRE_Z: self.noise_multiplier, WIRE_C: self.clip_norm, WIRE_COHORT: self.noise_cohort,
                WIRE_CLIPPING: CLIPPINGS.index(self.clipping)}

    @classmethod
    def from_message(cls, config: Mapping[str, Any], secure_mode: bool = False) -> "UserRound":
        """The round exactly as the server sent it (``secure_mode`` is the device's own)."""
        missing = [k for k in (WIRE_Z, WIRE_C, WIRE_COHORT, WIRE_CLIPPING) if k not in config]
        if missing:
            raise ValueError(f"the train message lacks the user-level parameters {missing}")
        code = int(config[WIRE_CLIPPING])  # type: ignore[arg-type]
        if not 0 <= code < len(CLIPPINGS):
            raise ValueError(f"unknown user-level clipping code {code}")
        return cls(float(config[WIRE_Z]), float(config[WIRE_C]), int(config[WIRE_COHORT]),  # type: ignore[arg-type]
                   CLIPPINGS[code], secure_mode)

    def echo(self) -> dict[str, float | int]:
        """What a device reports it used (public parameters only)."""
        return self.to_config()

    def check_echo(self, metrics: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` unless ``metrics`` echo exactly these parameters."""
        protocol.check_echo(self.to_config(), metrics)

    def clip(self, delta: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], bool]:
        """``delta`` clipped to C (flat or per-layer) and whether its norm was already within C."""
        if self.clipping == "per_layer":
            clipped, norms = per_layer_clip(delta, self.clip_norm)
            return clipped, math.hypot(*norms.values()) <= self.clip_norm
        clipped, norm = clip_update(delta, self.clip_norm)
        return clipped, norm <= self.clip_norm

    def privatize(self, delta: Mapping[str, Tensor], secret: Secret, release: int
                  ) -> tuple[dict[str, Tensor], Optional[float]]:
        """Clip ``delta`` and add this device's noise share (stream ``user-noise`` of ``secret`` for
        ``release``). Returns the update to send and, under adaptive clipping, the clip bit (sent in
        clear to the trusted server: adaptive clipping runs with central noise only)."""
        clipped, within = self.clip(delta)
        std = self.device_std
        if std > 0:
            noise = gaussian_noise_like(clipped, std, secret.stream(USER_NOISE, release), self.secure_mode)
            clipped = {k: v + noise[k] for k, v in clipped.items()}
        return clipped, (1.0 if within else 0.0) if self.clipping == "adaptive" else None


def server_facing_epsilon(noise_multipliers: Sequence[float], delta: float, accountant: str = "pld") -> float:
    """What a server learns about one device from its noised user-level releases, one per entry of
    ``noise_multipliers`` (each release's update noise multiplier z, ``local`` or ``distributed``).

    The server sees each noised update (local) or sums of >= t shares carrying noise of std z*C
    (distributed), and picks the cohort, so it knows the device took part: no amplification, and
    replace-one sensitivity 2C -- each release is Gaussian(z / 2), and the releases compose. The one
    formula behind :meth:`UserLevel.server_facing_epsilon` (the server's report) and a device's own
    server-facing ledger (``clients/state.py``). 0.0 for no release, inf for a release without noise.
    """
    counts: dict[float, int] = {}
    for z in noise_multipliers:
        counts[float(z)] = counts.get(float(z), 0) + 1
    return composed_epsilon([UserLevelSpec(z / 2.0, 1.0, n, delta, "fixed", accountant)  # type: ignore[arg-type]
                             for z, n in counts.items()])


def default_delta(population: int) -> float:
    """The user-level delta used when none is set: min(1e-5, 1 / (10 N)) for a population of N devices."""
    check_int("population", population, 1)
    return min(1e-5, 1.0 / (10 * population))


@dataclass
class UserLevel:
    """User-level DP-FedAvg, the server's half and the owner of the mechanism's parameters.

    Guarantee (``noise=central`` with a trusted server, ``local`` without trusting it, or
    ``distributed`` with an honest-but-curious server under secure aggregation): the sequence of
    global models is (epsilon, delta)-DP with respect to adding or removing all the data of any one
    device, where epsilon composes every round run -- each a Gaussian mechanism with noise
    multiplier z, subsampled with rate q = expected cohort / population under Poisson sampling --
    accounted by Google's dp-accounting over the *recorded* per-round (q, z) history, so a run
    resumed with another population composes what really happened. This holds because
      * each update is clipped to C on the device and, in central mode, clipped again here
        (``check_update``): no reply can move the sum by more than C;
      * the noised sum is divided by a public constant (the expected cohort), never by the number
        of replies or by example counts;
      * Gaussian noise of std z*C is on the sum, drawn from the server's secret stream (central)
        or the devices' (local, distributed), and a round with no replies still adds it;
      * devices are Poisson-sampled with the server's secret stream; with ``fixed`` sampling no
        amplification is claimed.
    For ``local``/``distributed`` the server itself sees single noised updates or sums of >= t
    of them, picks the cohort and sees who replied: ``server_facing_epsilon`` is what it learns.
    Adaptive clipping spends part of the same budget on the noised count of clip bits; updates then
    get the smaller ``effective_noise_multiplier`` and the accountant uses the total z.
    With ``population``/``cohort`` set, q and the noise describe that stated deployment, not the
    simulation, and every report says ``extrapolated``.
    """

    cfg: UserPrivacyConfig
    devices: int
    expected_cohort: int
    sampling: str
    planned_rounds: int
    history: list[tuple[float, float]] = field(default_factory=list)
    """(q, z) of every round accounted so far."""

    def __post_init__(self) -> None:
        cfg = self.cfg
        if cfg.noise not in USER_NOISE_PLACEMENTS:
            raise ValueError(f"privacy.user.noise={cfg.noise!r}: expected one of {USER_NOISE_PLACEMENTS}")
        if cfg.clipping not in CLIPPINGS:
            raise ValueError(f"privacy.user.clipping={cfg.clipping!r}: expected one of {CLIPPINGS}")
        if cfg.noise == "distributed" and (cfg.population is not None or cfg.secure_threshold < 3):
            raise ValueError("privacy.user.noise=distributed needs secure_threshold >= 3 and no extrapolation "
                             "(population/cohort): the simulated sum must carry the accounted noise")
        if cfg.clipping == "adaptive" and cfg.noise != "central":
            raise ValueError("privacy.user.clipping=adaptive is supported with noise=central only")
        if (cfg.population is None) != (cfg.cohort is None):
            raise ValueError("privacy.user.population and privacy.user.cohort go together (extrapolation)")
        if self.expected_cohort > self.devices:
            raise ValueError(f"a cohort of {self.expected_cohort} devices a round is larger than the "
                             f"{self.devices} devices connected: lower federation.clients_per_round")
        self.extrapolated = cfg.population is not None
        self.population: int = cfg.population if self.extrapolated else self.devices  # type: ignore[assignment]
        self.accounted_cohort: int = cfg.cohort if self.extrapolated else self.expected_cohort  # type: ignore[assignment]
        self.rate = extrapolate(self.population, self.accounted_cohort)
        self.delta = cfg.delta if cfg.delta is not None else default_delta(self.population)
        if not 0.0 < self.delta < 1.0 / self.population:
            raise ValueError(f"user-level delta {self.delta:g} is not below 1/N = 1/{self.population}: a "
                             "mechanism that publishes one device's data outright would meet it; set "
                             f"privacy.user.delta <= {0.1 / self.population:.3g} (1/(10 N)) or leave it null")
        if self.delta > 0.1 / self.population:
            log.warning("user-level delta %.3g is above 1/(10 N) = %.3g for N = %d devices", self.delta,
                        0.1 / self.population, self.population)
        self.z = cfg.noise_multiplier
        if cfg.target_epsilon is not None:
            self.z = calibrate_noise_multiplier(cfg.target_epsilon, self.rate, self.planned_rounds, self.delta,
                                                self.sampling, cfg.accountant)  # type: ignore[arg-type]
        self.adaptive = (AdaptiveClipNorm(cfg.clipping_norm, cfg.target_quantile, cfg.clip_learning_rate,
                                          cfg.count_noise_multiplier) if cfg.clipping == "adaptive" else None)
        self.z_update = self.adaptive.effective_noise_multiplier(self.z) if self.adaptive else self.z

    @property
    def secure(self) -> bool:
        """Distributed noise: updates are summed by secure aggregation, never seen one by one."""
        return self.cfg.noise == "distributed"

    @property
    def clip_norm(self) -> float:
        return self.adaptive.clip_norm if self.adaptive else self.cfg.clipping_norm

    @property
    def rounds(self) -> int:
        return len(self.history)

    def round(self) -> UserRound:
        """What devices must apply this round (sent in the train message, echoed back)."""
        cohort = {"central": 0, "local": 1, "distributed": self.cfg.secure_threshold}[self.cfg.noise]
        return UserRound(self.z_update, self.clip_norm, cohort, self.cfg.clipping)

    # -- accounting ------------------------------------------------------------------------------------
    def _specs(self, history: Sequence[tuple[float, float]]) -> list[UserLevelSpec]:
        groups: dict[tuple[float, float], int] = {}
        for q, z in history:
            groups[(q, z)] = groups.get((q, z), 0) + 1
        return [UserLevelSpec(z, q, n, self.delta, self.sampling, self.cfg.accountant)  # type: ignore[arg-type]
                for (q, z), n in groups.items()]

    def epsilon(self, extra_rounds: int = 0) -> float:
        """Epsilon towards observers of the models, over the recorded rounds plus ``extra_rounds``
        more at the current (q, z)."""
        return composed_epsilon(self._specs(self.history + [(self.rate, self.z)] * extra_rounds))

    def server_facing_epsilon(self, rounds: int) -> Optional[float]:
        """Local/distributed noise: what the server learns about a device that trained ``rounds``
        rounds. The server sees its noised update (local) or sums of >= t shares (distributed),
        each carrying noise of std z_update*C; it knows the device is in the cohort, so no
        amplification, and replace-one sensitivity 2C: Gaussian(z_update / 2) composed ``rounds``
        times (:func:`server_facing_epsilon`). None for central noise (the server is trusted and sees
        clear updates)."""
        if self.cfg.noise == "central":
            return None
        return server_facing_epsilon([self.z_update] * rounds, self.delta, self.cfg.accountant)

    def record_round(self) -> None:
        """Account one more round at the current (q, z): every round attempted counts."""
        self.history.append((self.rate, self.z))

    # -- distrusting replies ---------------------------------------------------------------------------
    def check_update(self, update: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """A device's update as the server may add it, or ``ValueError`` saying why it must be dropped.

        Central: re-clipped here to the round's C (flat or per layer): whatever a device sent, its
        contribution moves the sum by at most C. Local: the update carries noise, so it is only
        checked against the bound an honest update exceeds with probability <= 1e-9.
        """
        r = self.round()
        if self.cfg.noise == "central":
            return r.clip(update)[0]
        numel = sum(t.numel() for t in update.values())
        bound = r.clip_norm + noise_norm_bound(r.device_std, numel)
        norm = update_norm(update)
        if norm > bound:
            raise ValueError(f"update norm {norm:.4g} is above {bound:.4g}, the bound of a clipped, noised update")
        return {k: v.detach().clone() for k, v in update.items()}

    def check_total(self, total: Mapping[str, Tensor], contributors: int, step: float) -> None:
        """Raise ``ValueError`` unless a securely aggregated sum of ``contributors`` updates is finite
        and within the norm an honest one has (quantisation ``step`` per coordinate included)."""
        norm = update_norm(total)
        numel = sum(t.numel() for t in total.values())
        r = self.round()
        share = r.device_std * math.sqrt(contributors)
        bound = contributors * r.clip_norm + noise_norm_bound(share, numel) + contributors * step * math.sqrt(numel)
        if not norm <= bound:
            raise ValueError(f"the decoded sum of {contributors} updates has norm {norm:.4g}, above the {bound:.4g} "
                             "of honest clipped, noised updates (a device sent out-of-range values)")

    # -- the release -----------------------------------------------------------------------------------
    def aggregate(self, updates: list[Mapping[str, Tensor]], reference: Mapping[str, Tensor], clip_bits: list[float],
                  secret: Secret, server_round: int) -> dict[str, Tensor]:
        """The private average update of one round (``updates`` already checked), and the round accounted.

        A round with no update still releases noise. Noise: stream ``server-noise`` of the server's
        ``secret`` for ``server_round``; the adaptive count's noise: stream ``clip-count``.
        """
        total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in reference.items() if v.is_floating_point()}
        for u in updates:
            for k in total:
                total[k] += u[k].to(torch.float64)
        # noise on the sum, scaled so the simulated average has the deployment's noise when extrapolated
        std = 0.0
        if self.cfg.noise == "central":
            std = self.z_update * self.clip_norm * self.expected_cohort / self.accounted_cohort
        if std > 0:
            noise = gaussian_noise_like(total, std, secret.stream(SERVER_NOISE, server_round), self.cfg.secure_mode)
            total = {k: v + noise[k] for k, v in total.items()}
        if self.adaptive:
            self.adaptive.update(sum(clip_bits), self.expected_cohort, secret.stream(CLIP_COUNT, server_round),
                                 reports=len(clip_bits))
        self.record_round()
        return {k: (v / self.expected_cohort).to(reference[k].dtype) for k, v in total.items()}

    def state_dict(self) -> dict[str, Any]:
        """What changes round to round: the accounted (q, z) history and the adaptive clip norm."""
        return {"history": [list(h) for h in self.history], "clip_norm": self.clip_norm}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.history = [(float(q), float(z)) for q, z in state["history"]]
        if self.adaptive:
            self.adaptive.clip_norm = float(state["clip_norm"])

    def block(self, worst_rounds: int) -> dict[str, Any]:
        """The summary's ``privacy.user``: every figure needed to recompute each epsilon, by observer.

        ``worst_rounds``: the rounds the server-facing figure is stated for (the server passes every
        round run: a bound for every device, whoever the cohorts were).
        """
        qs = sorted({q for q, _ in self.history})
        return {
            "noise": self.cfg.noise, "noise_multiplier": self.z, "update_noise_multiplier": self.z_update,
            "clipping": self.cfg.clipping, "clipping_norm": self.clip_norm,
            "initial_clipping_norm": self.cfg.clipping_norm, "sampling": self.sampling,
            "sampling_rate": self.rate, "sampling_rates": qs, "history": [list(h) for h in self.history],
            "amplification": self.sampling == "poisson", "rounds": self.rounds,
            "population": self.population, "cohort": self.accounted_cohort, "extrapolated": self.extrapolated,
            "epsilon": self.epsilon(), "epsilon_observer": "anyone who sees the global models",
            "epsilon_server": self.server_facing_epsilon(worst_rounds),
            "epsilon_server_observer": None if self.cfg.noise == "central" else
            "the server (it picks the cohort and sees each noised update or sum)",
            "server_rounds": worst_rounds, "delta": self.delta, "accountant": self.cfg.accountant,
            "secure_mode": self.cfg.secure_mode,
        }
