"""User-level DP-FedAvg: the device's half (UserRound: clip, noise share, echo) and the server's half
(UserLevel: re-clipping, averaging, noise, checks of replies, accounting over the recorded history)."""

import math

import dp_accounting
import pytest
import torch

from fl.config import UserPrivacyConfig
from fl.privacy.accounting import RDP_ORDERS, UserLevelSpec, composed_epsilon, user_level_epsilon
from fl.privacy.gaussian import model_delta, noise_norm_bound, update_norm
from fl.privacy.randomness import Secret
from fl.privacy.user import UserLevel, UserRound, default_delta
from server.sampling import sample_cohort

REF = {"w": torch.zeros(50, 40), "b": torch.zeros(40)}
SERVER = Secret(bytes(32))
DEVICE = Secret.from_seed(0, "device:1")


def _updates(n, scale, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(v.shape, generator=g) * scale for k, v in REF.items()} for _ in range(n)]


def _level(devices=20, expected=4, sampling="poisson", rounds=5, **cfg) -> UserLevel:
    return UserLevel(UserPrivacyConfig(**cfg), devices=devices, expected_cohort=expected, sampling=sampling,
                     planned_rounds=rounds)


# -- the device's half ----------------------------------------------------------------------------------
def test_device_update_is_clipped_to_c_and_noise_free_when_central():
    r = _level(noise="central", clipping_norm=0.5).round()
    assert r.noise_cohort == 0 and r.device_std == 0.0
    for i, u in enumerate(_updates(20, 10.0)):
        out, bit = r.privatize(u, DEVICE, i)
        assert update_norm(out) <= 0.5 and bit is None
        assert torch.equal(out["w"], r.clip(u)[0]["w"])  # nothing added


def test_local_noise_has_the_full_std():
    r = _level(noise="local", noise_multiplier=2.0, clipping_norm=0.1).round()
    assert r.noise_cohort == 1 and r.device_std == pytest.approx(2.0 * 0.1)
    out, _ = r.privatize({"w": torch.zeros(200_000)}, DEVICE, 0)
    assert out["w"].std().item() == pytest.approx(0.2, rel=0.02)


def test_distributed_shares_add_up_to_z_c_on_the_sum():
    z, c, t = 1.3, 0.5, 16
    r = UserRound(z, c, t)
    assert r.device_std * math.sqrt(t) == pytest.approx(z * c)
    zero = {"x": torch.zeros(20_000)}
    total = sum(r.privatize(zero, Secret.from_seed(0, f"device:{i}"), 0)[0]["x"] for i in range(t))
    assert float(total.std()) == pytest.approx(z * c, rel=0.03)


def test_the_noise_share_comes_from_the_secret_stream_of_the_release():
    r, u = UserRound(1.0, 1.0, 1), _updates(1, 1.0)[0]
    a, b = r.privatize(u, DEVICE, 3)[0], r.privatize(u, DEVICE, 3)[0]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["w"], r.privatize(u, DEVICE, 4)[0]["w"])
    assert not torch.equal(a["w"], r.privatize(u, SERVER, 3)[0]["w"])


def test_adaptive_clipping_reports_whether_the_update_was_within_c():
    u = _updates(1, 1.0)[0]
    assert UserRound(1.0, 1e6, 0, "adaptive").privatize(u, DEVICE, 0)[1] == 1.0
    assert UserRound(1.0, 1e-3, 0, "adaptive").privatize(u, DEVICE, 0)[1] == 0.0


def test_per_layer_clipping_bounds_the_whole_update():
    out, within = UserRound(1.0, 0.5, 0, "per_layer").clip(_updates(1, 10.0)[0])
    assert update_norm(out) <= 0.5 and not within


def test_the_round_travels_to_the_device_and_its_echo_is_checked():
    sent = _level(noise="distributed", secure_threshold=5, clipping="per_layer", noise_multiplier=0.7).round()
    got = UserRound.from_message({**sent.to_config(), "server-round": 2}, secure_mode=True)
    assert (got.noise_multiplier, got.clip_norm, got.noise_cohort, got.clipping) == (0.7, 1.0, 5, "per_layer")
    assert got.secure_mode
    sent.check_echo(got.echo())
    for key, value in sent.echo().items():
        with pytest.raises(ValueError, match=key):
            sent.check_echo({**sent.echo(), key: value + 1})
    with pytest.raises(ValueError, match="lacks"):
        UserRound.from_message({"user-z": 1.0})
    with pytest.raises(ValueError, match="clipping code"):
        UserRound.from_message({**sent.to_config(), "user-clipping": 7})


def test_an_echo_that_is_not_a_scalar_is_refused():
    sent = UserRound(1.0, 1.0, 0)
    with pytest.raises(ValueError):
        sent.check_echo({**sent.echo(), "user-z": [1.0]})


def test_model_delta():
    base = {"a": torch.ones(3), "n": torch.tensor([2])}
    trained = {"a": torch.full((3,), 1.5), "n": torch.tensor([2])}
    assert torch.equal(model_delta(trained, base)["a"], torch.full((3,), 0.5))
    assert "n" not in model_delta(trained, base)


# -- the server's half ----------------------------------------------------------------------------------
def test_server_average_divides_by_the_expected_cohort_and_adds_z_c_noise():
    quiet = _level(noise_multiplier=0.0)
    ups = _updates(3, 1.0)
    avg = quiet.aggregate(ups, REF, [], SERVER, 1)
    assert torch.allclose(avg["w"], sum(u["w"] for u in ups) / 4, atol=1e-6)  # 4, not the 3 that replied
    noisy = _level(noise_multiplier=1.5, clipping_norm=2.0)
    empty = noisy.aggregate([], {"x": torch.zeros(100_000)}, [], SERVER, 1)
    assert empty["x"].std().item() == pytest.approx(1.5 * 2.0 / 4, rel=0.02)  # noise even with no replies
    assert noisy.rounds == 1 and noisy.history == [(0.2, 1.5)]
    small = {"x": torch.zeros(100)}
    again = _level(noise_multiplier=1.5, clipping_norm=2.0).aggregate([], small, [], SERVER, 1)
    assert torch.equal(again["x"], _level(noise_multiplier=1.5, clipping_norm=2.0).aggregate([], small, [], SERVER,
                                                                                               1)["x"])
    assert not torch.equal(again["x"], noisy.aggregate([], small, [], SERVER, 2)["x"])  # a stream per round


def test_central_check_update_re_clips_whatever_the_device_sent():
    level = _level(noise="central", clipping_norm=0.5)
    big = _updates(1, 10.0)[0]
    out = level.check_update(big)
    assert update_norm(out) <= 0.5 and update_norm(big) > 0.5
    small = {k: v * 1e-4 for k, v in big.items()}
    assert all(torch.equal(level.check_update(small)[k], small[k]) for k in small)


def test_local_check_update_passes_an_honest_update_and_rejects_an_oversized_one():
    level = _level(noise="local", noise_multiplier=1.0, clipping_norm=0.5)
    honest, _ = level.round().privatize(_updates(1, 10.0)[0], DEVICE, 0)
    assert all(torch.equal(level.check_update(honest)[k], honest[k]) for k in honest)
    numel = sum(t.numel() for t in REF.values())
    bound = 0.5 + noise_norm_bound(0.5, numel)
    with pytest.raises(ValueError, match="above"):
        level.check_update({k: v * 2 * bound / update_norm(honest) for k, v in honest.items()})


def test_check_total_rejects_non_finite_and_out_of_range_sums():
    level = _level(noise="distributed", secure_threshold=3, noise_multiplier=1.0, clipping_norm=0.5)
    r = level.round()
    shares = [r.privatize(u, Secret.from_seed(0, f"device:{i}"), 0)[0] for i, u in enumerate(_updates(4, 10.0))]
    total = {k: sum(s[k] for s in shares) for k in REF}
    level.check_total(total, 4, 1e-8)
    with pytest.raises(ValueError, match="norm"):
        level.check_total({k: v * 1e6 for k, v in total.items()}, 4, 1e-8)
    total["b"][0] = float("inf")
    with pytest.raises(ValueError, match="norm"):
        level.check_total(total, 4, 1e-8)


def test_reported_user_epsilon_is_recomputable_with_dp_accounting():
    level = _level(devices=50, expected=5, rounds=10, noise_multiplier=1.1, delta=1e-4)
    for r in range(7):
        level.aggregate([], REF, [], SERVER, r + 1)
    block = level.block(worst_rounds=3)
    acc = dp_accounting.rdp.RdpAccountant([1 + x / 8 for x in range(1, 200)] + list(range(26, 256)))
    event = dp_accounting.PoissonSampledDpEvent(block["sampling_rate"],
                                                dp_accounting.GaussianDpEvent(block["noise_multiplier"]))
    acc.compose(event, block["rounds"])
    rdp_eps = acc.get_epsilon(block["delta"])
    assert block["rounds"] == 7 and block["sampling_rate"] == pytest.approx(0.1)
    assert block["history"] == [[0.1, 1.1]] * 7 and block["epsilon_server"] is None  # central: trusted server
    assert block["epsilon"] <= rdp_eps * 1.001  # PLD is tighter than RDP ...
    assert block["epsilon"] >= rdp_eps * 0.75  # ... but not by much
    assert level.epsilon(1) > level.epsilon() > _level(devices=50, expected=5, noise_multiplier=1.1,
                                                        delta=1e-4).epsilon(1)


def test_a_heterogeneous_history_composes_both_groups():
    level = _level(devices=50, expected=5, noise_multiplier=1.0, delta=1e-4, accountant="rdp")
    level.load_state_dict({"history": [[0.1, 1.0]] * 3 + [[0.05, 1.0]] * 2, "clip_norm": 1.0})
    specs = [UserLevelSpec(1.0, 0.1, 3, 1e-4, "poisson", "rdp"), UserLevelSpec(1.0, 0.05, 2, 1e-4, "poisson", "rdp")]
    assert level.epsilon() == composed_epsilon(specs)
    acc = dp_accounting.rdp.RdpAccountant(list(RDP_ORDERS))
    acc.compose(dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.0)), 3)
    acc.compose(dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(1.0)), 2)
    assert level.epsilon() == pytest.approx(acc.get_epsilon(1e-4), rel=1e-9)
    assert user_level_epsilon(specs[1]) < level.epsilon() < user_level_epsilon(UserLevelSpec(1.0, 0.1, 5, 1e-4,
                                                                                             "poisson", "rdp"))
    assert level.block(0)["sampling_rates"] == [0.05, 0.1]


def test_state_round_trips_the_history_and_the_adaptive_clip_norm():
    level = _level(clipping="adaptive", noise_multiplier=1.0, count_noise_multiplier=2.0)
    level.aggregate([], REF, [1.0, 1.0, 1.0], SERVER, 1)
    fresh = _level(clipping="adaptive", noise_multiplier=1.0, count_noise_multiplier=2.0)
    fresh.load_state_dict(level.state_dict())
    assert fresh.history == level.history and fresh.clip_norm == level.clip_norm != 1.0
    assert fresh.epsilon() == level.epsilon()


def test_fixed_sampling_claims_no_amplification():
    kw = dict(devices=50, expected=5, rounds=10, noise_multiplier=1.0)
    assert _level(sampling="fixed", **kw).epsilon(3) > 2 * _level(sampling="poisson", **kw).epsilon(3)
    assert _level(sampling="fixed", **kw).block(0)["amplification"] is False


def test_extrapolation_is_labelled_and_scales_the_noise():
    cfg = UserPrivacyConfig(noise_multiplier=1.0, clipping_norm=1.0, population=10_000, cohort=100)
    level = UserLevel(cfg, devices=8, expected_cohort=4, sampling="poisson", planned_rounds=3)
    out = level.aggregate([], {"x": torch.zeros(100_000)}, [], SERVER, 1)
    assert out["x"].std().item() == pytest.approx(1.0 / 100, rel=0.02)  # the deployment's noise on the mean
    block = level.block(1)
    assert block["extrapolated"] is True and block["sampling_rate"] == pytest.approx(0.01)
    assert level.delta == pytest.approx(1 / 100_000)  # 1/(10 N) of the stated population


def test_distributed_noise_is_shared_by_the_secure_threshold_and_never_extrapolated():
    level = _level(devices=40, expected=10, rounds=3, noise="distributed", secure_threshold=5)
    assert level.secure and level.round().noise_cohort == 5  # any decodable sum has >= 5 noise shares
    out = level.aggregate([], {"x": torch.zeros(1000)}, [], SERVER, 1)
    assert torch.count_nonzero(out["x"]) == 0  # the server adds none itself
    for bad in (dict(secure_threshold=2), dict(population=1000, cohort=10)):
        with pytest.raises(ValueError, match="distributed"):
            _level(devices=40, expected=10, rounds=3, noise="distributed", **bad)


def test_the_server_facing_epsilon_has_no_amplification_and_twice_the_sensitivity():
    local = _level(devices=50, expected=5, noise="local", noise_multiplier=2.0)
    expected = user_level_epsilon(UserLevelSpec(1.0, 1.0, 4, local.delta, "fixed", "pld"))
    assert local.server_facing_epsilon(4) == expected > local.epsilon(4)
    assert local.block(4)["epsilon_server"] == expected
    assert _level(noise="central").server_facing_epsilon(4) is None


def test_target_epsilon_calibrates_the_noise():
    level = _level(devices=100, expected=10, rounds=20, target_epsilon=3.0, delta=1e-3)
    assert level.epsilon(20) <= 3.0 and level.epsilon(20) == pytest.approx(3.0, rel=0.02)


def test_delta_defaults_to_a_tenth_of_one_over_n_and_one_over_n_is_refused():
    assert _level(devices=50).delta == default_delta(50) == 1e-5  # 1/(10 N) = 2e-3 would be weak
    assert default_delta(1_000_000) == 1e-7
    assert _level(devices=50, delta=1e-5).delta == 1e-5
    for bad in (1 / 50, 0.5):
        with pytest.raises(ValueError, match="1/N"):
            _level(devices=50, delta=bad)
    with pytest.raises(ValueError, match="population"):
        default_delta(0)


def test_a_cohort_larger_than_the_devices_is_refused():
    with pytest.raises(ValueError, match="larger than"):
        _level(devices=3, expected=4)


def test_cohort_sampling():
    rng = Secret.from_seed(0, "test").stream("coins")
    nodes = list(range(100))
    sizes = [len(sample_cohort(nodes, 10, "poisson", rng)) for _ in range(300)]
    assert abs(sum(sizes) / 300 - 10) < 0.6 and len(set(sizes)) > 4
    assert all(len(sample_cohort(nodes, 10, "fixed", rng)) == 10 for _ in range(5))
    with pytest.raises(ValueError):
        sample_cohort(nodes, 10, "round-robin", rng)


def test_adaptive_clipping_sends_the_update_noise_accounts_the_total_and_follows_the_bits():
    level = _level(devices=20, expected=20, clipping="adaptive", noise_multiplier=1.0, count_noise_multiplier=1.0)
    assert level.round().noise_multiplier == level.z_update == pytest.approx(1 / math.sqrt(0.75))
    level.aggregate([], REF, [1.0] * 20, SERVER, 1)  # every update was within C: C shrinks
    assert level.history == [(1.0, 1.0)] and level.clip_norm < 1.0
    shrunk = level.clip_norm
    level.aggregate([], REF, [0.0] * 20, SERVER, 2)  # every update was clipped: C grows
    assert level.clip_norm > shrunk and level.round().clip_norm == level.clip_norm
    with pytest.raises(ValueError, match="adaptive"):
        _level(noise="local", clipping="adaptive")
