"""User-level accounting on dp_accounting: monotone, PLD vs RDP consistent, matches the exact
Gaussian mechanism, calibrates round-trip; sample-level DP-SGD accounting (PLD reported, RDP beside it,
Opacus' accountants as cross-checks) and calibration."""

import math

import dp_accounting
import pytest
from dp_accounting.pld import PLDAccountant
from opacus.accountants import RDPAccountant, create_accountant

from fl.privacy.accounting import (
    SAMPLE_ACCOUNTANTS,
    UserLevelSpec,
    calibrate_noise_multiplier,
    composed_epsilon,
    extrapolate,
    sample_level_epsilon,
    sample_level_noise_multiplier,
    user_level_epsilon,
)

DELTA = 1e-5


def _eps(z, q=0.01, rounds=200, sampling="poisson", accountant="pld", delta=DELTA) -> float:
    return user_level_epsilon(UserLevelSpec(z, q, rounds, delta, sampling, accountant))


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))


def exact_gaussian_epsilon(z: float, delta: float) -> float:
    """Epsilon of one Gaussian mechanism with noise multiplier z (Balle & Wang 2018, Thm. 8):
    delta(eps) = Phi(-eps z + 1/(2z)) - e^eps Phi(-eps z - 1/(2z)), decreasing in eps."""

    def delta_of(eps: float) -> float:
        return _phi(-eps * z + 1 / (2 * z)) - math.exp(eps) * _phi(-eps * z - 1 / (2 * z))

    lo, hi = 0.0, 1.0
    while delta_of(hi) > delta:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_of(mid) > delta else (lo, mid)
    return hi


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_epsilon_grows_with_rounds_and_rate_and_shrinks_with_noise(accountant):
    by_rounds = [_eps(1.0, q=0.05, rounds=t, accountant=accountant) for t in (1, 10, 100, 1000)]
    assert 0 < by_rounds[0] < by_rounds[1] < by_rounds[2] < by_rounds[3]
    by_rate = [_eps(1.0, q=q, accountant=accountant) for q in (0.01, 0.05, 0.2)]
    assert 0 < by_rate[0] < by_rate[1] < by_rate[2]
    by_noise = [_eps(z, accountant=accountant) for z in (0.6, 0.8, 1.0, 2.0)]
    assert by_noise[0] > by_noise[1] > by_noise[2] > by_noise[3] > 0


@pytest.mark.parametrize(
    "z,q,rounds", [(1.0, 0.01, 1000), (0.8, 0.05, 100), (1.5, 0.02, 500), (2.0, 0.1, 50)]
)
def test_pld_and_rdp_agree_and_rdp_is_looser(z, q, rounds):
    pld, rdp = _eps(z, q, rounds), _eps(z, q, rounds, accountant="rdp")
    assert pld <= rdp + 1e-2
    assert rdp <= 1.2 * pld


def test_fixed_sampling_claims_no_amplification():
    for z in (0.8, 1.0, 3.0):
        poisson, fixed = _eps(z, q=0.05), _eps(z, q=0.05, sampling="fixed")
        assert fixed > poisson
        # Fixed ignores q, and Poisson at q = 1 is the same un-amplified mechanism.
        assert _eps(z, q=0.5, sampling="fixed") == fixed
        assert _eps(z, q=1.0) == pytest.approx(fixed, rel=1e-2, abs=1e-2)


@pytest.mark.parametrize("z", [0.7, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("delta", [1e-5, 1e-3])
def test_one_round_matches_the_exact_gaussian_mechanism(z, delta):
    exact = exact_gaussian_epsilon(z, delta)
    pld = _eps(z, rounds=1, sampling="fixed", delta=delta)
    assert pld == pytest.approx(exact, abs=1e-2)
    assert pld >= exact - 1e-9  # PLD's discretisation is pessimistic: an upper bound
    assert _eps(z, rounds=1, sampling="fixed", accountant="rdp", delta=delta) >= exact


def test_fixed_rounds_compose_to_a_gaussian_with_noise_over_sqrt_rounds():
    for z, rounds in [(3.0, 9), (5.0, 100)]:
        exact = exact_gaussian_epsilon(z / math.sqrt(rounds), DELTA)
        assert _eps(z, rounds=rounds, sampling="fixed") == pytest.approx(exact, rel=1e-3, abs=1e-2)


def test_degenerate_cases_and_validation():
    assert _eps(1.0, rounds=0) == 0.0
    assert _eps(0.0, rounds=0) == 0.0
    assert _eps(1.0, q=0.0) == 0.0
    assert _eps(0.0) == math.inf
    bad = [
        dict(noise_multiplier=-1.0),
        dict(sampling_rate=1.5),
        dict(rounds=-1),
        dict(rounds=2.5),
        dict(delta=0.0),
        dict(delta=1.0),
        dict(sampling="shuffled"),
        dict(accountant="prv"),
    ]
    good = dict(noise_multiplier=1.0, sampling_rate=0.1, rounds=10, delta=DELTA)
    for change in bad:
        with pytest.raises(ValueError, match=next(iter(change))):
            UserLevelSpec(**{**good, **change})


@pytest.mark.parametrize(
    "target,q,rounds,sampling,accountant",
    [
        (2.0, 0.01, 300, "poisson", "pld"),
        (8.0, 0.05, 100, "poisson", "rdp"),
        (5.0, 1.0, 20, "fixed", "pld"),
    ],
)
def test_calibration_round_trips(target, q, rounds, sampling, accountant):
    z = calibrate_noise_multiplier(target, q, rounds, DELTA, sampling, accountant)
    spec = dict(sampling_rate=q, rounds=rounds, delta=DELTA, sampling=sampling)
    spec["accountant"] = accountant
    eps = user_level_epsilon(UserLevelSpec(z, **spec))
    assert eps <= target
    assert eps >= 0.98 * target
    assert user_level_epsilon(UserLevelSpec(z * (1 - 2e-3), **spec)) > target  # smallest z


def test_calibration_reports_unattainable_targets():
    with pytest.raises(ValueError, match="unattainable"):
        calibrate_noise_multiplier(1e-4, 1.0, 1000, DELTA, "fixed", "pld")
    with pytest.raises(ValueError, match="target_epsilon"):
        calibrate_noise_multiplier(0.0, 0.1, 10, DELTA)


def test_extrapolate():
    assert extrapolate(1_000_000, 1000) == 1e-3
    assert extrapolate(10, 10) == 1.0
    for population, cohort in [(10, 11), (0, 0), (100, 0), (100.0, 10)]:
        with pytest.raises(ValueError):
            extrapolate(population, cohort)


def test_sample_level_noise_multiplier_reaches_its_target_in_opacus():
    z = sample_level_noise_multiplier(3.0, DELTA, sample_rate=0.1, steps=400, accountant="rdp")
    acc = RDPAccountant()
    acc.history = [(z, 0.1, 400)]
    assert 2.9 <= acc.get_epsilon(delta=DELTA) <= 3.0
    with pytest.raises(ValueError, match="steps"):
        sample_level_noise_multiplier(3.0, DELTA, sample_rate=0.1, steps=0)
    with pytest.raises(ValueError, match="sample_rate"):
        sample_level_noise_multiplier(3.0, DELTA, sample_rate=0.0, steps=10)
    with pytest.raises(ValueError, match="gdp"):
        sample_level_noise_multiplier(3.0, DELTA, sample_rate=0.1, steps=10, accountant="gdp")


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_composed_fixed_rounds_are_one_gaussian_of_the_combined_noise(accountant):
    specs = [UserLevelSpec(1.5, 1.0, 10, DELTA, "fixed", accountant), UserLevelSpec(3.0, 1.0, 30, DELTA, "fixed",
                                                                                    accountant)]
    z_eff = (10 / 1.5**2 + 30 / 3.0**2) ** -0.5
    assert composed_epsilon(specs) == user_level_epsilon(UserLevelSpec(z_eff, 1.0, 1, DELTA, "fixed", accountant))
    if accountant == "pld":
        assert composed_epsilon(specs) == pytest.approx(exact_gaussian_epsilon(z_eff, DELTA), rel=0.01)


def test_composed_poisson_rounds_match_a_direct_pld_composition():
    specs = [UserLevelSpec(1.0, 0.02, 100, DELTA), UserLevelSpec(1.2, 0.05, 50, DELTA)]
    pld = PLDAccountant(value_discretization_interval=1e-4)
    for s in specs:
        event = dp_accounting.PoissonSampledDpEvent(s.sampling_rate, dp_accounting.GaussianDpEvent(s.noise_multiplier))
        pld.compose(dp_accounting.SelfComposedDpEvent(event, s.rounds))
    direct = pld.get_epsilon(DELTA)
    assert composed_epsilon(specs) == pytest.approx(direct, rel=0.01)
    assert composed_epsilon(specs) >= direct * 0.999  # still an upper bound
    assert max(map(user_level_epsilon, specs)) < composed_epsilon(specs) < sum(map(user_level_epsilon, specs))


def test_composing_one_spec_or_empty_ones_changes_nothing():
    spec = UserLevelSpec(1.1, 0.01, 200, DELTA)
    assert composed_epsilon([spec]) == user_level_epsilon(spec)
    assert composed_epsilon([spec, UserLevelSpec(0.5, 0.3, 0, DELTA), UserLevelSpec(0.5, 0.0, 5, DELTA)]) == \
        user_level_epsilon(spec)
    assert composed_epsilon([]) == 0.0
    assert composed_epsilon([spec, UserLevelSpec(0.0, 0.01, 1, DELTA)]) == math.inf
    with pytest.raises(ValueError, match="share"):
        composed_epsilon([spec, UserLevelSpec(1.1, 0.01, 5, DELTA, accountant="rdp")])


# -- sample-level (utterance-level) DP-SGD -----------------------------------------------------------------
def _fine_pld(history, delta=DELTA, interval=1e-4) -> float:
    pld = PLDAccountant(value_discretization_interval=interval)
    for z, q, steps in history:
        event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
        pld.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return float(pld.get_epsilon(delta))


@pytest.mark.parametrize("z,q,steps", [(1.0, 0.25, 40), (0.62, 0.035, 60), (0.5, 0.03, 500), (2.0, 0.01, 1000)])
def test_sample_level_pld_is_below_rdp(z, q, steps):
    pld, rdp = sample_level_epsilon([(z, q, steps)], DELTA), sample_level_epsilon([(z, q, steps)], DELTA, "rdp")
    assert 0 < pld < rdp
    assert sample_level_epsilon([(z, q, steps)], DELTA, "pld") == pld  # pld is the default


@pytest.mark.parametrize("z,q,steps,interval", [(1.0, 0.25, 40, 1e-4), (0.62, 0.035, 60, 2e-4)])
def test_sample_level_pld_is_a_tight_upper_bound(z, q, steps, interval):
    pld, fine = sample_level_epsilon([(z, q, steps)], DELTA), _fine_pld([(z, q, steps)], interval=interval)
    assert fine - 10 * interval <= pld <= fine * 1.01  # both pessimistic: the fine grid's own slack ~10 steps


def test_sample_level_prv_lands_on_pld():
    history = [(0.62, 0.035, 60)]
    assert sample_level_epsilon(history, DELTA, "prv") == pytest.approx(sample_level_epsilon(history, DELTA), rel=0.01)


@pytest.mark.parametrize("z,q,steps", [(0.5, 0.03, 60), (0.62, 0.035, 60), (1.0, 0.25, 40), (0.5, 0.03, 500)])
def test_sample_level_rdp_is_opacus_and_agrees_with_dp_accounting(z, q, steps):
    acc = create_accountant("rdp")
    acc.history = [(z, q, steps)]
    ours = sample_level_epsilon([(z, q, steps)], DELTA, "rdp")
    assert ours == acc.get_epsilon(DELTA)
    # dp_accounting's RDP on the same orders bounds the fractional orders' series term by term (and
    # drops unconverged ones): never below Opacus', and within 1.5% here
    rdp = dp_accounting.rdp.RdpAccountant([float(a) for a in RDPAccountant.DEFAULT_ALPHAS])
    rdp.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps))
    assert ours * (1 - 1e-9) <= rdp.get_epsilon(DELTA) <= ours * 1.015


@pytest.mark.parametrize("accountant", SAMPLE_ACCOUNTANTS)
def test_sample_level_histories_compose(accountant):
    q = 0.035
    a, b = (1.0, q, 100), (0.7, q, 30)
    both = sample_level_epsilon([a, b], DELTA, accountant)
    assert both > max(sample_level_epsilon([a], DELTA, accountant), sample_level_epsilon([b], DELTA, accountant))
    assert sample_level_epsilon([b, a], DELTA, accountant) == pytest.approx(both, rel=1e-6)
    assert sample_level_epsilon([(0.8, q, 20), (0.8, q, 45)], DELTA, accountant) == pytest.approx(
        sample_level_epsilon([(0.8, q, 65)], DELTA, accountant), rel=1e-6)
    if accountant == "pld":
        assert both == pytest.approx(_fine_pld([a, b], interval=5e-4), rel=0.01)


def test_sample_level_degenerate_cases_and_validation():
    assert sample_level_epsilon([], DELTA) == 0.0
    assert sample_level_epsilon([(1.0, 0.1, 0), (0.5, 0.2, 0)], DELTA, "rdp") == 0.0
    assert sample_level_epsilon([(1.0, 0.1, 0), (1.0, 0.1, 10)], DELTA) == sample_level_epsilon([(1.0, 0.1, 10)], DELTA)
    assert sample_level_epsilon([(1e-3, 1.0, 10)], DELTA, "prv") == math.inf  # Opacus' PRV overflows: inf
    good = (1.0, 0.1, 10)
    for entry, match in [((0.0, 0.1, 10), "noise"), ((-1.0, 0.1, 10), "noise"), ((math.nan, 0.1, 10), "noise"),
                         ((1.0, 0.0, 10), "sample_rate"), ((1.0, 1.5, 10), "sample_rate"),
                         ((1.0, 0.1, -1), "steps"), ((1.0, 0.1, 2.5), "steps"), ((1.0, 0.1, True), "steps")]:
        with pytest.raises(ValueError, match=match):
            sample_level_epsilon([good, entry], DELTA)
    for delta in (0.0, 1.0):
        with pytest.raises(ValueError, match="delta"):
            sample_level_epsilon([good], delta)
    with pytest.raises(ValueError, match="gdp"):
        sample_level_epsilon([good], DELTA, "gdp")


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
@pytest.mark.parametrize("target", [4.0, 8.0])
def test_sample_level_calibration_is_the_smallest_noise(target, accountant):
    q, steps = 64 / 1825, 60
    z = sample_level_noise_multiplier(target, DELTA, q, steps, accountant)
    assert sample_level_epsilon([(z, q, steps)], DELTA, accountant) <= target
    assert sample_level_epsilon([(z * (1 - 2e-3), q, steps)], DELTA, accountant) > target


@pytest.mark.parametrize("target", [4.0, 8.0])
def test_sample_level_pld_calibrates_less_noise_than_rdp(target):
    q, steps = 64 / 1825, 60
    z = sample_level_noise_multiplier(target, DELTA, q, steps)  # pld, the default
    assert z == sample_level_noise_multiplier(target, DELTA, q, steps, "pld")
    assert z < 0.97 * sample_level_noise_multiplier(target, DELTA, q, steps, "rdp")


def test_sample_level_calibration_with_prv_and_unattainable_targets():
    q, steps = 64 / 1825, 60
    z = sample_level_noise_multiplier(2.0, DELTA, q, steps, "prv")
    acc = create_accountant("prv")
    acc.history = [(z, q, steps)]
    assert 1.98 <= acc.get_epsilon(DELTA) <= 2.0
    with pytest.raises(ValueError, match="unattainable"):
        sample_level_noise_multiplier(1e-9, DELTA, 1.0, 1000, "rdp")
