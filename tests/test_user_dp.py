"""User-level DP-FedAvg: device-side clipping/noise, server-side averaging/noise, accounting."""

import random

import dp_accounting
import pytest
import torch

from fl.config import UserPrivacyConfig
from fl.privacy.update import model_delta, privatize_update
from fl.privacy.user import update_norm
from server.sampling import sample_cohort
from server.user_dp import UserLevelDP

REF = {"w": torch.zeros(50, 40), "b": torch.zeros(40)}


def _updates(n, scale, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(v.shape, generator=g) * scale for k, v in REF.items()} for _ in range(n)]


def test_device_update_is_clipped_to_c_and_noise_free_when_central():
    cfg = UserPrivacyConfig(noise="central", clipping_norm=0.5)
    for u in _updates(20, 10.0):
        out, bit = privatize_update(u, cfg, 0.5, 4, torch.Generator().manual_seed(0))
        assert update_norm(out) <= 0.5 and bit is None


def test_local_noise_has_the_full_std():
    cfg = UserPrivacyConfig(noise="local", noise_multiplier=2.0, clipping_norm=0.1)
    zero = {"w": torch.zeros(200_000)}
    out, _ = privatize_update(zero, cfg, 0.1, 8, torch.Generator().manual_seed(1))
    assert out["w"].std().item() == pytest.approx(0.2, rel=0.02)


def test_adaptive_clipping_reports_a_bit():
    cfg = UserPrivacyConfig(clipping="adaptive", clipping_norm=1e6)
    _, bit = privatize_update(_updates(1, 1.0)[0], cfg, 1e6, 4, None)
    assert bit == 1.0


def test_model_delta():
    base = {"a": torch.ones(3), "n": torch.tensor([2])}
    trained = {"a": torch.full((3,), 1.5), "n": torch.tensor([2])}
    assert torch.equal(model_delta(trained, base)["a"], torch.full((3,), 0.5))
    assert "n" not in model_delta(trained, base)


def test_server_average_divides_by_the_expected_cohort_and_adds_z_c_noise():
    quiet = UserLevelDP(UserPrivacyConfig(noise_multiplier=0.0), devices=20, expected_cohort=4,
                        sampling="poisson", planned_rounds=5, seed=0)
    ups = _updates(3, 1.0)
    avg = quiet.aggregate(ups, REF, [])
    assert torch.allclose(avg["w"], sum(u["w"] for u in ups) / 4, atol=1e-6)  # 4, not the 3 that replied
    noisy = UserLevelDP(UserPrivacyConfig(noise_multiplier=1.5, clipping_norm=2.0), devices=20,
                        expected_cohort=4, sampling="poisson", planned_rounds=5, seed=0)
    empty = noisy.aggregate([], {"x": torch.zeros(100_000)}, [])
    assert empty["x"].std().item() == pytest.approx(1.5 * 2.0 / 4, rel=0.02)  # noise even with no replies
    assert noisy.rounds == 1


def test_reported_user_epsilon_is_recomputable_with_dp_accounting():
    dp = UserLevelDP(UserPrivacyConfig(noise_multiplier=1.1, delta=1e-4), devices=50, expected_cohort=5,
                     sampling="poisson", planned_rounds=10, seed=0)
    for _ in range(7):
        dp.aggregate([], REF, [])
    block = dp.block()
    acc = dp_accounting.rdp.RdpAccountant([1 + x / 8 for x in range(1, 200)] + list(range(26, 256)))
    gaussian = dp_accounting.GaussianDpEvent(block["noise_multiplier"])
    event = dp_accounting.PoissonSampledDpEvent(block["sampling_rate"], gaussian)
    acc.compose(event, block["rounds"])
    rdp_eps = acc.get_epsilon(block["delta"])
    assert block["rounds"] == 7 and block["sampling_rate"] == pytest.approx(0.1)
    assert block["epsilon"] <= rdp_eps * 1.001  # PLD is tighter than RDP ...
    assert block["epsilon"] >= rdp_eps * 0.75  # ... but not by much
    assert dp.epsilon(8) > dp.epsilon(7) > dp.epsilon(1)


def test_fixed_sampling_claims_no_amplification():
    kw = dict(devices=50, expected_cohort=5, planned_rounds=10, seed=0)
    poisson = UserLevelDP(UserPrivacyConfig(noise_multiplier=1.0), sampling="poisson", **kw)
    fixed = UserLevelDP(UserPrivacyConfig(noise_multiplier=1.0), sampling="fixed", **kw)
    assert fixed.epsilon(3) > 2 * poisson.epsilon(3)
    assert fixed.block()["amplification"] is False


def test_extrapolation_is_labelled_and_scales_the_noise():
    cfg = UserPrivacyConfig(noise_multiplier=1.0, clipping_norm=1.0, population=10_000, cohort=100)
    dp = UserLevelDP(cfg, devices=8, expected_cohort=4, sampling="poisson", planned_rounds=3, seed=0)
    out = dp.aggregate([], {"x": torch.zeros(100_000)}, [])
    assert out["x"].std().item() == pytest.approx(1.0 / 100, rel=0.02)  # the deployment's noise on the mean
    block = dp.block()
    assert block["extrapolated"] is True and block["sampling_rate"] == pytest.approx(0.01)


def test_distributed_noise_is_shared_by_the_secure_threshold_and_never_extrapolated():
    dp = UserLevelDP(UserPrivacyConfig(noise="distributed", secure_threshold=5), devices=40, expected_cohort=10,
                     sampling="poisson", planned_rounds=3, seed=0)
    assert dp.secure and dp.device_config()["noise-cohort"] == 5  # any decodable sum has >= 5 noise shares
    out = dp.aggregate([], {"x": torch.zeros(1000)}, [])
    assert torch.count_nonzero(out["x"]) == 0  # the server adds none itself
    for bad in (dict(secure_threshold=2), dict(population=1000, cohort=10)):
        with pytest.raises(ValueError, match="distributed"):
            UserLevelDP(UserPrivacyConfig(noise="distributed", **bad), devices=40, expected_cohort=10,
                        sampling="poisson", planned_rounds=3, seed=0)


def test_target_epsilon_calibrates_the_noise():
    dp = UserLevelDP(UserPrivacyConfig(target_epsilon=3.0, delta=1e-3), devices=100, expected_cohort=10,
                     sampling="poisson", planned_rounds=20, seed=0)
    assert dp.epsilon(20) <= 3.0 and dp.epsilon(20) == pytest.approx(3.0, rel=0.02)


def test_cohort_sampling():
    rng = random.Random(0)
    nodes = list(range(100))
    sizes = [len(sample_cohort(nodes, 10, "poisson", rng)) for _ in range(300)]
    assert abs(sum(sizes) / 300 - 10) < 0.6 and len(set(sizes)) > 4
    assert all(len(sample_cohort(nodes, 10, "fixed", rng)) == 10 for _ in range(5))
    with pytest.raises(ValueError):
        sample_cohort(nodes, 10, "round-robin", rng)
