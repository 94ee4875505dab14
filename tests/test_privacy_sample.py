"""Sample-level DP-SGD: every step is a counted mechanism call, noise comes from the device's secret,
the account composes, and server and device agree on one mechanism."""

import math
import random

import dp_accounting
import pytest
import torch

from fl.config import SamplePrivacyConfig, TrainConfig
from fl.model.conformer import ConformerCTC, ConformerRecognizer
from fl.privacy.randomness import Secret
from fl.privacy.sample import SampleAccount, SampleLevel, poisson_batch
from tests.conftest import TINY

SECRET = Secret(bytes(32))


def _round(examples, account, tokenizer, steps=3, q=0.25, z=1.0, release=0, secret=SECRET):
    torch.manual_seed(0)  # the same initial model every time
    recognizer = ConformerRecognizer(TINY)
    model = recognizer.new_module()
    level = SampleLevel(z, 1.0, q, steps)
    loss = level.train(model, recognizer, examples, TrainConfig(local_steps=steps, batch_size=4, lr=1e-3), account,
                       secret, release)
    return model, loss


def _same(a, b) -> bool:
    return all(torch.equal(v, w) for v, w in zip(a.state_dict().values(), b.state_dict().values()))


def test_epsilon_accumulates_across_train_calls(examples, tokenizer):
    account = SampleAccount()
    _, loss = _round(examples, account, tokenizer)
    eps1 = account.epsilon(1e-5)
    for r in range(2):
        _round(examples, account, tokenizer, release=r + 1)
    assert math.isfinite(loss) and account.steps == 9 and account.history == [(1.0, 0.25, 3)] * 3
    assert account.epsilon(1e-5) > eps1 > 0


def test_no_examples_still_runs_every_step_counts_it_and_moves_the_weights_by_noise(tokenizer):
    account = SampleAccount()
    torch.manual_seed(0)
    before = ConformerCTC(TINY, tokenizer.vocab_size).state_dict()
    model, loss = _round([], account, tokenizer, steps=4)
    assert math.isnan(loss) and account.steps == 4
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "noise-only steps must still move the weights"


def test_same_secret_and_release_give_the_same_model_and_another_release_does_not(examples, tokenizer):
    a, _ = _round(examples, SampleAccount(), tokenizer, release=3)
    b, _ = _round(examples, SampleAccount(), tokenizer, release=3)
    assert _same(a, b)
    c, _ = _round(examples, SampleAccount(), tokenizer, release=4)
    d, _ = _round(examples, SampleAccount(), tokenizer, release=3, secret=Secret.from_seed(0, "device:1"))
    assert not _same(a, c) and not _same(a, d)


def test_reported_epsilon_matches_dp_accounting(examples, tokenizer):
    account = SampleAccount()
    _round(examples, account, tokenizer, steps=5, q=1 / 3, z=1.1)
    z, q, steps = account.history[0]
    assert (z, q, steps) == (1.1, 1 / 3, 5)
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    acc = dp_accounting.rdp.RdpAccountant(orders)
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(1.1)), steps)
    assert math.isclose(account.epsilon(1e-5), acc.get_epsilon(1e-5), rel_tol=0.05)
    assert SampleLevel(1.1, 1.0, 1 / 3, 5).epsilon(1) == account.epsilon(1e-5)


def test_poisson_batch_rate_is_right():
    rng = random.Random(0)
    sizes = [len(poisson_batch(100, 0.1, rng)) for _ in range(400)]
    assert abs(sum(sizes) / len(sizes) - 10.0) < 0.5
    assert len(set(sizes)) > 5  # the batch size varies: not fixed-size sampling
    assert poisson_batch(0, 0.5, rng) == [] and poisson_batch(5, 1.0, rng) == [0, 1, 2, 3, 4]


def test_a_target_epsilon_holds_for_a_device_in_every_round():
    cfg = SamplePrivacyConfig(target_epsilon=4.0, delta=1e-5, sample_rate=0.25)
    level = SampleLevel.from_config(cfg, TrainConfig(local_steps=8), rounds=10)
    assert level.steps == 8 and level.sample_rate == 0.25
    assert level.epsilon(10) <= 4.0 and level.epsilon(10) == pytest.approx(4.0, rel=0.05)
    fixed = SampleLevel.from_config(SamplePrivacyConfig(noise_multiplier=1.3), TrainConfig(local_steps=8), 10)
    assert fixed.noise_multiplier == 1.3


def test_gdp_and_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="gdp"):
        SampleLevel(1.0, 1.0, 0.25, 8, accountant="gdp")
    with pytest.raises(ValueError, match="gdp"):
        SampleLevel.from_config(SamplePrivacyConfig(target_epsilon=4.0, accountant="gdp"), TrainConfig(), 10)
    for bad in (dict(noise_multiplier=0.0), dict(max_grad_norm=-1.0), dict(sample_rate=0.0), dict(steps=0),
                dict(steps=True), dict(delta=1.0)):
        with pytest.raises(ValueError):
            SampleLevel(**{**dict(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.25, steps=8), **bad})


def test_the_mechanism_travels_to_the_device_and_its_echo_is_checked():
    server = SampleLevel(0.9, 1.5, 0.2, 6, delta=1e-5, accountant="rdp")
    policy = SamplePrivacyConfig(delta=1e-6, accountant="prv", secure_mode=True)
    device = SampleLevel.from_message({**server.to_config(), "server-round": 3}, policy)
    assert (device.noise_multiplier, device.max_grad_norm, device.sample_rate, device.steps) == (0.9, 1.5, 0.2, 6)
    assert (device.delta, device.accountant, device.secure_mode) == (1e-6, "prv", True)  # the device's own
    server.check_echo(device.echo())
    for key, value in server.echo().items():
        with pytest.raises(ValueError, match=key):
            server.check_echo({**server.echo(), key: value * 2})
        with pytest.raises(ValueError, match=key):
            server.check_echo({k: v for k, v in server.echo().items() if k != key})
    with pytest.raises(ValueError, match="lacks"):
        SampleLevel.from_message({"sample-z": 1.0}, policy)


def test_an_echo_that_is_not_a_scalar_is_refused():
    sent = SampleLevel(1.0, 1.0, 0.25, 8)
    with pytest.raises(ValueError):
        sent.check_echo({**sent.echo(), "sample-z": [1.0]})
