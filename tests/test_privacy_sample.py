"""Sample-level DP-SGD: every step is a counted mechanism call, noise comes from the device's secret,
the account composes, and server and device agree on one mechanism."""

import copy
import math

import dp_accounting
from dp_accounting.pld import PLDAccountant
import pytest
import torch

from fl.config import SamplePrivacyConfig, TrainConfig
from fl.model.conformer import ConformerCTC, ConformerRecognizer
from fl.privacy.randomness import Secret, Stream
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
    rdp = SampleAccount(history=account.history, accountant="rdp")
    assert math.isclose(rdp.epsilon(1e-5), acc.get_epsilon(1e-5), rel_tol=0.05)
    # the reported PLD figure: dp-accounting's own PLD, and tighter than RDP
    pld = PLDAccountant(value_discretization_interval=1e-4)
    pld.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(1.1)), steps)
    assert account.accountant == "pld"
    assert pld.get_epsilon(1e-5) - 1e-3 <= account.epsilon(1e-5) <= pld.get_epsilon(1e-5) * 1.01
    assert account.epsilon(1e-5) < rdp.epsilon(1e-5)
    assert SampleLevel(1.1, 1.0, 1 / 3, 5).epsilon(1) == account.epsilon(1e-5)


def test_poisson_batch_rate_is_right():
    rng = Secret.from_seed(0, "test").stream("coins")
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
            server.check_echo({**server.echo(), key: value * 2 + 1})
        with pytest.raises(ValueError, match=key):
            server.check_echo({k: v for k, v in server.echo().items() if k != key})
    with pytest.raises(ValueError, match="lacks"):
        SampleLevel.from_message({"sample-z": 1.0}, policy)


def test_an_echo_that_is_not_a_scalar_is_refused():
    sent = SampleLevel(1.0, 1.0, 0.25, 8)
    with pytest.raises(ValueError):
        sent.check_echo({**sent.echo(), "sample-z": [1.0]})


def test_the_stream_noise_step_is_opacus_own_step_given_the_same_noise(monkeypatch):
    """``StreamNoiseDPOptimizer`` replaces only where the noise comes from: fed the noise it drew,
    Opacus' own ``DPOptimizer`` makes the identical step (clipping, sum, scaling, AdamW)."""
    import opacus.optimizers.optimizer as opacus_optimizer
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    from fl.privacy.sample import StreamNoiseDPOptimizer

    torch.manual_seed(0)
    template = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    x, y = torch.randn(7, 6), torch.randint(0, 3, (7,))
    drawn: list[torch.Tensor] = []
    stream = Secret(bytes(32)).stream("dp-sgd-noise", 0)
    original = stream.gaussian_like

    def recording(*args, **kwargs):
        drawn.extend(original(*args, **kwargs))
        return drawn[-4:]

    monkeypatch.setattr(stream, "gaussian_like", recording)

    def step(make):
        model = GradSampleModule(copy.deepcopy(template))
        opt = make(torch.optim.AdamW(model.parameters(), lr=0.1))
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        return [p.detach().clone() for p in model.parameters()]

    kw = dict(noise_multiplier=1.3, max_grad_norm=0.5, expected_batch_size=8)
    ours = step(lambda o: StreamNoiseDPOptimizer(o, stream=stream, **kw))
    assert len(drawn) == 4 and all(d.abs().sum() > 0 for d in drawn)
    replay, stds = iter(drawn), []

    def opacus_noise(std, reference, **_):
        stds.append(std)
        return next(replay)

    monkeypatch.setattr(opacus_optimizer, "_generate_noise", opacus_noise)
    theirs = step(lambda o: DPOptimizer(o, **kw))
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    assert stds == [1.3 * 0.5] * 4 and float(torch.cat([d.flatten() for d in drawn]).std()) == pytest.approx(
        0.65, rel=0.5)  # our draws have Opacus' std (4 small tensors: a loose check of scale)
    monkeypatch.setattr(opacus_optimizer, "_generate_noise", lambda std, reference, **_: torch.zeros_like(reference))
    noiseless = step(lambda o: DPOptimizer(o, **kw))
    assert not all(torch.equal(a, b) for a, b in zip(ours, noiseless))  # the noise was really added


def test_every_bit_of_the_key_changes_the_noise_and_the_coins():
    """Flip any of 64 bits spread over the 256-bit stream key, high and low: the Gaussians and the
    Poisson coins both change (nothing is drawn from part of the key), and so for the secret."""
    key = bytes(range(100, 132))
    base = Stream(key)
    noise, coins = base.gaussian((32,), 1.0), base.coins(256, 0.5)
    secret = Secret(key)
    for bit in range(0, 256, 4):
        flipped = bytearray(key)
        flipped[bit // 8] ^= 1 << (bit % 8)
        other = Stream(bytes(flipped))
        assert not torch.equal(other.gaussian((32,), 1.0), noise), bit
        assert other.coins(256, 0.5) != coins, bit
        assert Secret(bytes(flipped)).stream_key("dp-sgd-noise", 0) != secret.stream_key("dp-sgd-noise", 0)


def test_stream_draws_have_the_right_distributions():
    stream = Secret(bytes(32)).stream("test")
    u = stream.uniform(200_000)
    assert 0.0 <= u.min() and u.max() < 1.0 and abs(u.mean() - 0.5) < 0.003
    z = stream.gaussian((200_000,), 1.5, torch.float64)
    assert float(z.std()) == pytest.approx(1.5, rel=0.01) and abs(float(z.mean())) < 0.012
    assert float((z.abs() > 1.96 * 1.5).double().mean()) == pytest.approx(0.05, abs=0.003)
    kurtosis = float(((z / z.std()) ** 4).mean())
    assert kurtosis == pytest.approx(3.0, abs=0.06)  # Gaussian tails, not uniform or Laplace
    secure = stream.gaussian((200_000,), 1.5, torch.float64, secure=True)
    assert float(secure.std()) == pytest.approx(1.5, rel=0.01)
    chosen = stream.choose(list(range(10)), 4)
    assert len(set(chosen)) == 4 and chosen == sorted(chosen)
    with pytest.raises(ValueError):
        stream.choose([1, 2], 3)
    # the same key replays the same values; draws continue the keystream
    a, b = Secret(bytes(32)).stream("x"), Secret(bytes(32)).stream("x")
    first = a.gaussian((5,), 1.0)
    assert torch.equal(first, b.gaussian((5,), 1.0)) and not torch.equal(first, a.gaussian((5,), 1.0))


@pytest.mark.parametrize("n", [1, 2, 5])
def test_secure_noise_sums_four_draws_of_four_different_box_muller_pairs(monkeypatch, n):
    """Opacus' mitigation needs four independent draws a sample: the cosine and the sine of one
    Box-Muller pair sum to a single Gaussian of the same two uniforms, which would undo it. Each
    draw is tagged with a power of two; every sample must add four of them, from four pairs, and
    no draw may serve two samples."""
    stream = Stream(bytes(32))
    size = 8 if n == 1 else 4 * n
    pairs = size // 2  # standard_normal(size) = cosines of pairs 0..pairs-1, then their sines
    monkeypatch.setattr(stream, "standard_normal", lambda m: torch.tensor([2.0**i for i in range(m)],
                                                                           dtype=torch.float64))
    samples = stream.gaussian((n,), 1.0, torch.float64, secure=True) * 2
    used: list[int] = []
    for value in samples.tolist():
        draws = [i for i in range(size) if int(value) >> i & 1]
        assert len(draws) == 4 and len({i % pairs for i in draws}) == 4, draws
        used += draws
    assert len(used) == len(set(used))


def test_stream_labels_are_unambiguous():
    secret = Secret(bytes(32))
    assert secret.stream_key("split", "a|b") != secret.stream_key("split", "a", "b")
    assert secret.stream_key("x", 1) == secret.stream_key("x", "1")  # an index is its text


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_equal_rounds_are_composed_once_with_the_same_epsilon(accountant):
    """A ledger of 20 equal rounds and 3 others: composing equal (z, q) entries once gives the
    epsilon of composing every entry (exactly for RDP; PRV within its numerical tolerance), and
    the ledger itself keeps one entry a round. Checked against dp-accounting's RDP too."""
    from opacus.accountants import create_accountant

    history = [(0.8, 0.25, 8)] * 20 + [(1.2, 0.25, 8)] * 3
    account = SampleAccount(history=list(history), accountant=accountant)
    assert account.composed() == [(0.8, 0.25, 160), (1.2, 0.25, 24)] and account.history == history
    every = create_accountant(accountant)
    every.history = list(history)
    assert account.epsilon(1e-5) == pytest.approx(every.get_epsilon(1e-5), rel=1e-12 if accountant == "rdp" else 1e-6)
    if accountant == "rdp":
        orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
        independent = dp_accounting.rdp.RdpAccountant(orders)
        for z, q, n in history:
            independent.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), n)
        assert account.epsilon(1e-5) == pytest.approx(independent.get_epsilon(1e-5), rel=0.05)
