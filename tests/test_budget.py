"""The device's ledger file, its target-epsilon noise and its own budget."""

import pytest

from clients import budget
from fl.config import SamplePrivacyConfig
from fl.privacy.sample import SampleAccount


def test_ledger_round_trips_and_survives_a_new_process_view(tmp_path):
    path = tmp_path / "ledger.json"
    assert budget.load_account(path, "rdp").history == []
    acc = SampleAccount(history=[(0.8, 0.25, 8), (0.8, 0.25, 8)])
    budget.save_account(path, acc, 0.8)
    again = budget.load_account(path, "rdp")
    assert again.history == acc.history and again.epsilon(1e-5) == acc.epsilon(1e-5)


def test_target_epsilon_noise_is_derived_once_and_then_fixed(tmp_path):
    path = tmp_path / "ledger.json"
    cfg = SamplePrivacyConfig(target_epsilon=4.0, delta=1e-5)
    sigma = budget.noise_multiplier(path, cfg, rate=0.25, local_steps=8, planned_rounds=10, participation=0.5)
    planned = SampleAccount(history=[(sigma, 0.25, 8 * 5)])
    assert planned.epsilon(1e-5) == pytest.approx(4.0, rel=0.05) and planned.epsilon(1e-5) <= 4.0 + 1e-6
    budget.save_account(path, SampleAccount(history=[(sigma, 0.25, 8)]), sigma)
    assert budget.noise_multiplier(path, cfg, 0.5, 8, 100, 1.0) == sigma  # never changes mid-run
    assert budget.noise_multiplier(tmp_path / "other.json", SamplePrivacyConfig(noise_multiplier=1.3), 0.25, 8, 10,
                                   0.5) == 1.3


def test_a_device_refuses_the_round_that_would_exceed_its_budget():
    cfg = SamplePrivacyConfig(max_epsilon=10.0, delta=1e-5)
    acc = SampleAccount()
    rounds = 0
    while not budget.would_exceed(acc, cfg, 1.0, 0.25, 8):
        acc.history.append((1.0, 0.25, 8))
        rounds += 1
    assert rounds >= 2
    assert acc.epsilon(1e-5) <= 10.0
    assert SampleAccount(history=acc.history + [(1.0, 0.25, 8)]).epsilon(1e-5) > 10.0
    assert not budget.would_exceed(acc, SamplePrivacyConfig(max_epsilon=None), 1.0, 0.25, 8)
