"""Sample-level DP-SGD: every step is a counted mechanism call and the account composes."""

import math

import dp_accounting
import pytest
import torch

from fl.config import SamplePrivacyConfig, TrainConfig
from fl.model.conformer import ConformerCTC
from fl.privacy.sample import SampleAccount, dp_sgd_round, poisson_batch
from tests.conftest import TINY


def _round(examples, account, tokenizer, steps=3, batch=4, sigma=1.0, seed=0):
    torch.manual_seed(seed)
    model = ConformerCTC(TINY, tokenizer.vocab_size)
    stats = dp_sgd_round(
        model, examples, TrainConfig(local_steps=steps, batch_size=batch, lr=1e-3),
        SamplePrivacyConfig(noise_multiplier=sigma, max_grad_norm=1.0), account,
        tokenizer.blank, TINY.n_mels, seed,
    )
    return model, stats


def test_epsilon_accumulates_across_rounds(examples, tokenizer):
    account = SampleAccount()
    _round(examples, account, tokenizer)
    eps1 = account.epsilon(1e-5)
    for r in range(2):
        _round(examples, account, tokenizer, seed=r + 1)
    assert account.steps == 9
    assert account.epsilon(1e-5) > eps1 > 0


def test_empty_poisson_batches_still_count_and_add_noise(examples, tokenizer):
    account = SampleAccount()
    torch.manual_seed(0)
    before = ConformerCTC(TINY, tokenizer.vocab_size).state_dict()
    # rate 1/12 on 12 examples: with seed 0 some of the 6 steps sample no example at all
    model, stats = _round(examples, account, tokenizer, steps=6, batch=1)
    assert stats.empty_steps > 0
    assert account.steps == 6
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "noise-only steps must still move the weights"


def test_same_seed_gives_the_same_model(examples, tokenizer):
    a, _ = _round(examples, SampleAccount(), tokenizer, seed=3)
    b, _ = _round(examples, SampleAccount(), tokenizer, seed=3)
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k


def test_reported_epsilon_matches_dp_accounting(examples, tokenizer):
    account = SampleAccount()
    _round(examples, account, tokenizer, steps=5, batch=4, sigma=1.1)
    _, q, steps = account.history[0]
    assert q == pytest.approx(4 / len(examples)) and steps == 5
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    acc = dp_accounting.rdp.RdpAccountant(orders)
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(1.1)), steps)
    independent = acc.get_epsilon(1e-5)
    assert math.isclose(account.epsilon(1e-5), independent, rel_tol=0.05)


def test_poisson_batch_rate_is_right():
    import random

    rng = random.Random(0)
    sizes = [len(poisson_batch(100, 0.1, rng)) for _ in range(400)]
    assert abs(sum(sizes) / len(sizes) - 10.0) < 0.5
    assert len(set(sizes)) > 5  # the batch size varies: not fixed-size sampling
