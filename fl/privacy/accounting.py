"""Privacy accounting: user-level for DP-FedAvg on Google's ``dp_accounting`` (not Opacus), and
sample-level for DP-SGD (PLD on ``dp_accounting``; RDP and PRV from Opacus), see the end.

What is accounted: ``rounds`` rounds, each releasing the sum of the cohort's contributions, each of
L2 norm <= C, plus Gaussian noise of std z*C on the sum (``fl.privacy.user``). The epsilon returned
is an upper bound (PLD: pessimistic discretisation; RDP: its conversion to (epsilon, delta)) on the
privacy loss of everything released over the rounds, with respect to one device's whole data set:

* ``poisson``: every device joins each round's cohort independently with probability
  q = expected cohort / population, and who was sampled is not released (a trusted server may
  know it). Adjacency: add or remove one device. Each round is
  ``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` (amplification by sampling), composed over the rounds.
* ``fixed``: cohorts of a fixed size (without replacement, round robin, availability-driven...).
  No amplification is claimed: for sampling without replacement it is only proven for replace-one
  adjacency (sensitivity 2C), and availability-driven selection is not random at all. So a device
  is assumed to be in every round: ``GaussianDpEvent(z)`` composed ``rounds`` times, ``q`` unused.
  Adjacency: zero-out -- the device's data replaced by a null device contributing a zero update
  (Kairouz et al. 2021, DP-FTRL), which moves the sum by at most C. Under replace-one adjacency the
  sensitivity would be 2C, i.e. the epsilon of noise multiplier z/2.

Adaptive clipping (``AdaptiveClipNorm``) is covered by accounting its total noise multiplier
z_total, not the one left for the updates.

Sample-level (utterance-level) DP-SGD, a separate budget (``fl.privacy.sample``): a device's history
is a list of ``(z, q, steps)`` runs, each step a Poisson-subsampled Gaussian mechanism (rate q,
noise std z*C, adjacency: add or remove one utterance), all composed (``sample_level_epsilon``).
The reported figure is PLD (dp_accounting; tight, and with its pessimistic discretisation an upper
bound), with RDP beside it (Opacus' RDP accountant, looser: the figure DP-SGD usually reports;
dp_accounting's RDP bounds the fractional orders' series term by term and is up to ~5% looser
still at q = 0.25). ``prv`` (Opacus' PRV accountant's upper bound) is accepted too.
No amplification by *device* sampling is claimed at sample level: a device is accounted over every
round it was asked to train in, each of its steps at rate q -- conservative.
``sample_level_noise_multiplier`` calibrates z for a target epsilon with the same accountants.
"""

from __future__ import annotations

import functools
import logging
import math
import numbers
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import dp_accounting
import numpy as np
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from opacus.accountants import create_accountant

log = logging.getLogger(__name__)

Sampling = Literal["poisson", "fixed"]
Accountant = Literal["pld", "rdp"]
SAMPLINGS: tuple[str, ...] = ("poisson", "fixed")
ACCOUNTANTS: tuple[str, ...] = ("pld", "rdp")

# Privacy-loss grid of the PLD accountant for noise multipliers >= 0.5 (per round, or of the whole
# composition for ``fixed``): 1000 subsampled-Gaussian rounds take ~0.1-0.2 s. The PLD's support,
# so the cost, grows like 1/noise: below 0.5 the grid coarsens like 1/noise^2, as epsilon grows.
# The pessimistic discretisation adds up to ~10 grid steps to epsilon; when that could exceed ~1%
# the epsilon is recomputed on a grid of epsilon/1000 (no finer than PLD_FINEST).
PLD_DISCRETIZATION = 1e-3
PLD_FINEST = 1e-4
# RDP orders: fine below 10, where the optimum lies for moderate epsilon, then integers and a few
# large orders for very small epsilon. (dp_accounting drops, with a warning, fractional orders near
# 1 whose series fails to converge for large q; that only loosens the bound.)
RDP_ORDERS: tuple[float, ...] = tuple(
    np.concatenate(
        [1.0 + np.arange(1, 37) / 4.0, np.arange(11, 65), [80, 96, 128, 192, 256, 384, 512, 1024]]
    ).tolist()
)
_MIN_Z, _MAX_Z = 1e-3, 1e5  # calibration search range of the noise multiplier


@dataclass(frozen=True)
class UserLevelSpec:
    """One DP-FedAvg run as the accountant sees it; validated on construction.

    ``noise_multiplier`` z (std of the noise on the sum / C; 0 means no noise, epsilon = inf),
    ``sampling_rate`` q = expected cohort / population, ``rounds`` the number of noised releases,
    ``delta``, ``sampling`` (``poisson`` or ``fixed``, see the module doc), ``accountant``
    (``pld``: tight; ``rdp``: looser, the classic moments accountant).
    """

    noise_multiplier: float
    sampling_rate: float
    rounds: int
    delta: float
    sampling: Sampling = "poisson"
    accountant: Accountant = "pld"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ValueError(
                f"noise_multiplier must be finite and >= 0, got {self.noise_multiplier!r}"
            )
        if not 0.0 <= self.sampling_rate <= 1.0:
            raise ValueError(
                f"sampling_rate must be in [0, 1] (expected cohort / population), "
                f"got {self.sampling_rate!r}"
            )
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 0:
            raise ValueError(f"rounds must be an integer >= 0, got {self.rounds!r}")
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"delta must be in (0, 1), got {self.delta!r}")
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {self.sampling!r}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}")


def _round_event(spec: UserLevelSpec) -> dp_accounting.DpEvent:
    gaussian = dp_accounting.GaussianDpEvent(spec.noise_multiplier)
    if spec.sampling == "fixed":
        return gaussian
    return dp_accounting.PoissonSampledDpEvent(spec.sampling_rate, gaussian)


def _pld_epsilon_of(events: Sequence[dp_accounting.DpEvent], delta: float, interval: float) -> float:
    """Epsilon at ``delta`` of ``events`` composed in one PLD accountant on a grid of ``interval``.

    The pessimistic discretisation adds up to ~10 grid steps to epsilon; when that could exceed
    ~1% the epsilon is recomputed on a grid of epsilon/1000 (no finer than ``PLD_FINEST``). Both
    are upper bounds: the smaller is returned.
    """

    def epsilon(value_discretization_interval: float) -> float:
        accountant = PLDAccountant(value_discretization_interval=value_discretization_interval)
        for event in events:
            accountant.compose(event)
        return float(accountant.get_epsilon(delta))

    eps = epsilon(interval)
    finer = max(eps / 1000.0, PLD_FINEST)
    if finer < interval / 2:
        eps = min(eps, epsilon(finer))  # both are upper bounds (pessimistic discretisation)
    return eps


def _pld_interval(noise_multiplier: float) -> float:
    """PLD grid for noise multiplier z: ``PLD_DISCRETIZATION``, coarsened like 1/z^2 below z = 0.5."""
    return PLD_DISCRETIZATION * max(1.0, (0.5 / noise_multiplier) ** 2)


def _pld_epsilon(spec: UserLevelSpec) -> float:
    z = spec.noise_multiplier
    if spec.sampling == "fixed":
        z /= math.sqrt(spec.rounds)  # T-fold Gaussian(z) is one Gaussian(z / sqrt(T))
    event = dp_accounting.SelfComposedDpEvent(_round_event(spec), spec.rounds)
    return _pld_epsilon_of([event], spec.delta, _pld_interval(z))


def user_level_epsilon(spec: UserLevelSpec) -> float:
    """Epsilon (at ``spec.delta``) of ``spec.rounds`` DP-FedAvg rounds; see the module doc.

    0.0 for zero rounds (or a Poisson rate of 0); ``math.inf`` without noise, and for noise so small
    that the accountant's arithmetic overflows (an epsilon beyond any meaning; inf is still a bound).
    """
    if spec.rounds == 0 or (spec.sampling == "poisson" and spec.sampling_rate == 0.0):
        return 0.0
    if spec.noise_multiplier == 0.0:
        return math.inf
    try:
        if spec.accountant == "pld":
            return _pld_epsilon(spec)
        accountant = RdpAccountant(orders=list(RDP_ORDERS))
        accountant.compose(dp_accounting.SelfComposedDpEvent(_round_event(spec), spec.rounds))
        return float(accountant.get_epsilon(spec.delta))
    except (OverflowError, MemoryError):
        log.warning("user-level epsilon of noise multiplier %g overflows the accountant: reporting inf",
                    spec.noise_multiplier)
        return math.inf


def composed_epsilon(specs: Sequence[UserLevelSpec]) -> float:
    """Epsilon of running every spec's rounds in sequence (heterogeneous rounds: a resumed run whose
    population, hence q, changed, or any per-round (q, z) history).

    The specs must share delta, sampling and accountant. ``fixed`` sampling composes exactly: T_i
    Gaussian rounds of noise z_i are one Gaussian of noise (sum_i T_i / z_i^2)^(-1/2). ``poisson``
    composes every spec's subsampled rounds in one accountant (PLD on the finest grid any of them
    needs, or RDP).
    """
    specs = [s for s in specs if s.rounds > 0 and not (s.sampling == "poisson" and s.sampling_rate == 0.0)]
    if not specs:
        return 0.0
    first = specs[0]
    if any((s.delta, s.sampling, s.accountant) != (first.delta, first.sampling, first.accountant) for s in specs):
        raise ValueError("composed specs must share delta, sampling and accountant")
    if len(specs) == 1 or any(s.noise_multiplier == 0.0 for s in specs):
        return max(user_level_epsilon(s) for s in specs) if len(specs) == 1 else math.inf
    if first.sampling == "fixed":
        z = sum(s.rounds / s.noise_multiplier**2 for s in specs) ** -0.5
        return user_level_epsilon(UserLevelSpec(z, 1.0, 1, first.delta, "fixed", first.accountant))
    events = [dp_accounting.SelfComposedDpEvent(_round_event(s), s.rounds) for s in specs]
    if first.accountant == "rdp":
        rdp = RdpAccountant(orders=list(RDP_ORDERS))
        for event in events:
            rdp.compose(event)
        return float(rdp.get_epsilon(first.delta))
    interval = min(_pld_interval(s.noise_multiplier) for s in specs)
    try:
        return _pld_epsilon_of(events, first.delta, interval)
    except (OverflowError, MemoryError):
        return math.inf


def calibrate_noise_multiplier(
    target_epsilon: float,
    sampling_rate: float,
    rounds: int,
    delta: float,
    sampling: Sampling = "poisson",
    accountant: Accountant = "pld",
    rtol: float = 1e-3,
) -> float:
    """Smallest noise multiplier z (to ``rtol`` relative) with ``user_level_epsilon <= target``.

    Bisection on log z; the returned z is always one whose epsilon was computed and found
    <= ``target_epsilon``. Raises ``ValueError`` when even z = 1e5 does not reach the target.
    """
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"target_epsilon must be a finite number > 0, got {target_epsilon!r}")
    if not 0 < rtol < 1:
        raise ValueError(f"rtol must be in (0, 1), got {rtol!r}")

    @functools.lru_cache(maxsize=None)
    def epsilon(z: float) -> float:
        return user_level_epsilon(
            UserLevelSpec(z, sampling_rate, rounds, delta, sampling, accountant)
        )

    hi = 1.0
    while epsilon(hi) > target_epsilon:
        if hi >= _MAX_Z:
            raise ValueError(
                f"epsilon {target_epsilon} is unattainable in {rounds} rounds at q={sampling_rate} "
                f"({sampling} sampling) even with noise multiplier {_MAX_Z:g}: raise the target, "
                "or use fewer rounds or a smaller sampling rate"
            )
        hi = min(2.0 * hi, _MAX_Z)
    lo = hi / 2.0
    while epsilon(lo) <= target_epsilon:
        if lo <= _MIN_Z:
            return lo
        hi, lo = lo, max(lo / 2.0, _MIN_Z)
    while hi / lo > 1.0 + rtol:
        mid = math.sqrt(lo * hi)
        if epsilon(mid) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    log.info(
        "calibrated user-level noise multiplier %.4f for epsilon %.3g (delta %.1e, %d rounds, "
        "q=%.3g, %s sampling, %s)", hi, target_epsilon, delta, rounds, sampling_rate, sampling,
        accountant,
    )
    return hi


def extrapolate(population: int, cohort: int) -> float:
    """Sampling rate q = cohort / population for accounting a stated, larger deployment.

    Simulations run a few devices per round, but the guarantee is meant for the deployment: an
    expected ``cohort`` per round out of ``population`` devices (as pfl-research does with its
    ``population`` and ``noise_cohort_size``). Account with this q, and in simulation add the noise
    the deployment would put on the *average*: std z*C / cohort on the mean of the simulated
    devices, i.e. z*C * simulated_cohort / cohort on their sum. The epsilon then describes the
    deployment, not the simulation, and is only valid if the deployment really runs that way.
    """
    for name, value in (("population", population), ("cohort", cohort)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if cohort > population:
        raise ValueError(f"cohort ({cohort}) cannot exceed the population ({population})")
    return cohort / population


# -- sample-level (utterance-level) DP-SGD ----------------------------------------------------------
SAMPLE_ACCOUNTANTS: tuple[str, ...] = ("pld", "rdp", "prv")
"""Sample-level accountants whose epsilon is an upper bound (Opacus' ``gdp`` is an approximation: refused)."""


def _sample_history(history: Sequence[tuple[float, float, int]]) -> tuple[tuple[float, float, int], ...]:
    """``history`` validated, with the steps of equal (z, q) runs added up, steps-0 runs dropped, in a
    canonical (sorted) order: composition is commutative, so this is the same mechanism."""
    steps: dict[tuple[float, float], int] = {}
    for entry in history:
        z, q, n = entry
        if isinstance(z, bool) or not isinstance(z, numbers.Real) or not (math.isfinite(z) and z > 0):
            raise ValueError(f"sample-level noise multiplier must be finite and > 0, got {z!r} in {entry!r}")
        if isinstance(q, bool) or not isinstance(q, numbers.Real) or not 0.0 < q <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {q!r} in {entry!r}")
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
            raise ValueError(f"steps must be an integer >= 0, got {n!r} in {entry!r}")
        if n > 0:
            key = (float(z), float(q))
            steps[key] = steps.get(key, 0) + int(n)
    return tuple(sorted((z, q, n) for (z, q), n in steps.items()))


def _sample_event(z: float, q: float, steps: int) -> dp_accounting.DpEvent:
    gaussian = dp_accounting.GaussianDpEvent(z)
    step = gaussian if q == 1.0 else dp_accounting.PoissonSampledDpEvent(q, gaussian)
    return dp_accounting.SelfComposedDpEvent(step, steps)


@functools.lru_cache(maxsize=4096)
def _sample_epsilon(history: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    # cached: devices' ledgers repeat (same rounds, same mechanism), and calibration re-asks
    try:
        if accountant == "pld":
            events = [_sample_event(*entry) for entry in history]
            return _pld_epsilon_of(events, delta, min(_pld_interval(z) for z, _, _ in history))
        opacus = create_accountant(accountant)  # rdp, prv: Opacus' own, exactly as DP-SGD reports it
        opacus.history = list(history)
        with np.errstate(divide="ignore"):  # PRV takes log(1 - q): -inf at q = 1, handled, but warned
            return float(opacus.get_epsilon(delta))
    except (OverflowError, MemoryError):
        log.warning("sample-level epsilon of history %s overflows the %s accountant: reporting inf",
                    list(history), accountant)
        return math.inf


def sample_level_epsilon(
    history: Sequence[tuple[float, float, int]], delta: float, accountant: str = "pld"
) -> float:
    """Epsilon at ``delta`` of a device's DP-SGD history: every ``(z, q, steps)`` entry is ``steps``
    Poisson-subsampled Gaussian steps (rate q, noise multiplier z; add/remove-one-utterance
    adjacency), all composed.

    ``accountant``: ``pld`` (dp_accounting's privacy loss distributions: tight, an upper bound by
    pessimistic discretisation -- the reported figure), ``rdp`` (Opacus' RDP accountant, its default
    orders: looser, the classic figure) or ``prv`` (Opacus' PRV accountant, its upper bound). 0.0
    for an empty history (or zero steps); ``math.inf`` when the accountant's arithmetic overflows.
    Equal (z, q) entries are merged and the order of entries does not matter.
    """
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if accountant not in SAMPLE_ACCOUNTANTS:
        raise ValueError(f"sample-level accountant {accountant!r} is not one of {SAMPLE_ACCOUNTANTS}: "
                         "gdp is an approximation, not a bound")
    runs = _sample_history(history)
    if not runs:
        return 0.0
    return _sample_epsilon(runs, float(delta), accountant)


def _smallest_noise(epsilon: Callable[[float], float], target: float, rtol: float, unattainable: str) -> float:
    """Smallest z in [_MIN_Z, _MAX_Z] (to ``rtol`` relative) with ``epsilon(z) <= target``, for an
    ``epsilon`` decreasing in z; the z returned is one whose epsilon was computed and is <= target.

    A bracket [lo, hi] (epsilon(lo) > target >= epsilon(hi)) by doubling or halving from z = 1, as
    ``calibrate_noise_multiplier`` does; then, since log epsilon is nearly linear in log z, false
    position on the chord's root, pushed a little (doubling while the same end keeps moving) past
    it so that both ends close in: ~4 evaluations instead of bisection's ~10. Bisection whenever
    the bracket has not halved in 4 evaluations.
    """
    known: dict[float, float] = {}

    def f(z: float) -> float:  # log(epsilon / target): > 0 too little noise, <= 0 enough
        if z not in known:
            eps = epsilon(z)
            known[z] = -math.inf if eps <= 0.0 else math.log(eps / target) if math.isfinite(eps) else math.inf
        return known[z]

    hi = 1.0
    while f(hi) > 0:
        if hi >= _MAX_Z:
            raise ValueError(unattainable)
        hi = min(2.0 * hi, _MAX_Z)
    lo = hi / 2.0
    while f(lo) <= 0:
        if lo <= _MIN_Z:
            return lo
        hi, lo = lo, max(lo / 2.0, _MIN_Z)
    tol = math.log1p(rtol)
    u_lo, u_hi = math.log(lo), math.log(hi)
    side, push = 0, tol / 2  # side: +1 if hi moved last, -1 if lo did
    width, tries = u_hi - u_lo, 0
    while u_hi - u_lo > tol:
        w = u_hi - u_lo
        f_lo, f_hi = f(lo), f(hi)
        if tries < 4 and math.isfinite(f_lo) and math.isfinite(f_hi):
            u = u_lo + w * f_lo / (f_lo - f_hi) - side * push
            margin = min(w / 4.0, tol / 8.0)
            u = min(max(u, u_lo + margin), u_hi - margin)  # strictly inside: the bracket shrinks
        else:
            u = u_lo + w / 2.0
        z = math.exp(u)
        moved = 1 if f(z) <= 0 else -1
        if moved > 0:
            hi, u_hi = z, u
        else:
            lo, u_lo = z, u
        push = 2.0 * push if moved == side else tol / 2
        side = moved
        tries += 1
        if u_hi - u_lo <= width / 2.0:
            width, tries = u_hi - u_lo, 0
    return hi


def sample_level_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "pld",
    rtol: float = 1e-3,
) -> float:
    """Smallest DP-SGD noise multiplier z (to ``rtol`` relative) whose ``sample_level_epsilon`` after
    ``steps`` steps at rate ``sample_rate`` (a device's whole training over all rounds it will take
    part in) is <= ``target_epsilon``, with ``accountant`` (``pld``, ``rdp`` or ``prv``; ``gdp`` is
    an approximation, not a bound, and is refused). The z returned is one whose epsilon was
    computed and found <= the target. Raises ``ValueError`` when even z = 1e5 does not reach it.
    """
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"target_epsilon must be a finite number > 0, got {target_epsilon!r}")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if accountant not in SAMPLE_ACCOUNTANTS:
        raise ValueError(f"sample-level accountant {accountant!r} is not one of {SAMPLE_ACCOUNTANTS}: "
                         "gdp is not a bound")
    if not 0 < rtol < 1:
        raise ValueError(f"rtol must be in (0, 1), got {rtol!r}")
    z = _smallest_noise(
        lambda z: sample_level_epsilon([(z, sample_rate, steps)], delta, accountant),
        target_epsilon, rtol,
        f"sample-level epsilon {target_epsilon} is unattainable in {steps} steps at q={sample_rate} even with "
        f"noise multiplier {_MAX_Z:g}: raise the target, or use fewer steps or a smaller sample rate",
    )
    log.info("calibrated sample-level noise multiplier %.4f for epsilon %.3g (delta %.1e, %d steps, q=%.3g, %s)",
             z, target_epsilon, delta, steps, sample_rate, accountant)
    return z
