"""DP-FedSGD (``privacy.sample.noise=central|distributed``): the device clips and sums, the aggregate is
noised once and stepped. Each test names what breaks it."""

import math

import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from clients import client_app
from clients.client_app import DeviceSettings
from clients.policy import check_mechanism
from fl import protocol as P
from fl.config import DevicePolicy, SamplePrivacyConfig, TrainConfig
from fl.privacy.accounting import sample_level_epsilon
from fl.privacy.randomness import BATCHES, Secret
from fl.privacy.sample import ClippingModule, SampleAccount, SampleLevel, per_sample_backward, poisson_batch
from tests.conftest import TINY, OneDevice, fake_examples, tiny_global, train_message

KEY = Secret(bytes(range(32)))


def fedsgd(noise="central", z=1.0, c=1.0, q=0.5, steps=2, **kw) -> SampleLevel:
    cfg = SamplePrivacyConfig(noise_multiplier=z, max_grad_norm=c, sample_rate=q, noise=noise, **kw)
    return SampleLevel.from_config(cfg, TrainConfig(local_steps=steps, batch_size=2), rounds=3, expected_cohort=4)


def per_example_clipped_sum(recognizer, model, examples, level: SampleLevel, secret: Secret, release: int):
    """The oracle: one backward per utterance, clipped by hand, summed over the same Poisson batches."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters() if p.requires_grad}
    coins = secret.stream(BATCHES, release)
    for _ in range(level.steps):
        batch = {n: torch.zeros_like(t) for n, t in total.items()}
        for i in poisson_batch(len(examples), level.sample_rate, coins):
            model.zero_grad(set_to_none=True)
            recognizer.losses(model, recognizer.collate([examples[i]])).sum().backward()
            grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if n in names}
            norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads.values()))
            factor = min(1.0, level.max_grad_norm / (norm + 1e-6))
            for n in names:
                batch[n] += factor * grads[n]
        norm = math.sqrt(sum(float(v.pow(2).sum()) for v in batch.values()))  # each batch projected
        factor = min(1.0, level.sum_cap / level.steps / norm) if norm > 0 else 1.0
        for n in names:
            total[n] += factor * batch[n]
    return total


def test_the_device_sends_the_sum_of_its_clipped_per_utterance_gradients(conformer):
    """Breaks if clipping, the Poisson batches or the accumulation over steps change (vs a hand oracle)."""
    examples = fake_examples(6)
    level = fedsgd(c=0.05, q=0.5, steps=3)
    weights = tiny_global().to_torch_state_dict()
    before = {k: v.clone() for k, v in weights.items()}
    account = SampleAccount()
    got = level.clipped_sum(weights, ClippingModule(conformer), examples, account, KEY, release=4)
    assert all(torch.equal(before[k], v) for k, v in weights.items())  # nothing is stepped
    model = conformer.module_from(weights)
    oracle_model = conformer.module_from(tiny_global().to_torch_state_dict())
    want = per_example_clipped_sum(conformer, oracle_model, examples, level, KEY, 4)
    assert set(got) == {k for k, v in conformer.shared(model).items() if v.is_floating_point()}
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-6)
    norm = math.sqrt(sum(float(v.pow(2).sum()) for v in got.values()))
    assert 0 < norm <= level.sum_cap
    assert account.history == [(level.noise_multiplier, level.sample_rate, level.steps)]


def test_each_batch_is_projected_before_the_batches_are_added(conformer):
    """With a cap that binds, the reply is the sum of the batches' projections (what makes a round
    ``steps`` composed steps), not the projection of their sum."""
    level = SampleLevel(1.0, 1.0, 0.6, 3, noise="central", expected_batch=8.0, sum_cap=0.3)
    examples = fake_examples(6)
    got = level.clipped_sum(tiny_global().to_torch_state_dict(), ClippingModule(conformer), examples, SampleAccount(),
                            KEY, 2)
    want = per_example_clipped_sum(conformer, conformer.module_from(tiny_global().to_torch_state_dict()),
                                   examples, level, KEY, 2)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-6)
    norm = math.sqrt(sum(float(v.double().pow(2).sum()) for v in got.values()))
    assert 0.1 < norm <= 0.3 + 1e-6  # more than one batch's share, within the cap


@pytest.mark.parametrize("clip", [0.01, 100.0])
def test_a_batch_of_one_is_clipped_as_opacus_clips_it(conformer, clip):
    """A batch of one utterance takes a plain backward with Opacus' hooks off: its sum must be what
    Opacus' own per-sample gradients and ``clip_and_accumulate`` give for it, with a clip that binds
    and one that does not -- and a batch of several after it in the same call is its own sum (breaks
    if the hooks stay on for the single, whose per-sample gradients Opacus would then carry over)."""
    weights = tiny_global().to_torch_state_dict()
    module = ClippingModule(conformer)
    for examples in (fake_examples(1), fake_examples(3)[2:]):
        got = module.clipped_sums(weights, [examples], clip, 1e9)
        gs = GradSampleModule(conformer.module_from(weights), batch_first=True, loss_reduction="mean")
        named = [(n, p) for n, p in gs._module.named_parameters() if p.requires_grad]
        opacus = DPOptimizer(torch.optim.SGD([p for _, p in named], lr=0.0), noise_multiplier=0.0,
                             max_grad_norm=clip, expected_batch_size=1, loss_reduction="mean")
        per_sample_backward(gs, conformer, conformer.collate(examples))
        opacus.clip_and_accumulate()
        assert set(got) == {n for n, p in named if p.summed_grad is not None}
        for n, p in named:
            if p.summed_grad is not None:
                torch.testing.assert_close(got[n], p.summed_grad, rtol=1e-4, atol=1e-7, msg=n)
        assert module._wrapped is not None and module._wrapped.hooks_enabled
    # a batch of one, then one of several, in one call: each batch's own sum, nothing carried over
    one, several = fake_examples(1), fake_examples(4)[1:]
    together = module.clipped_sums(weights, [one, several], clip, 1e9)
    apart = [ClippingModule(conformer).clipped_sums(weights, [b], clip, 1e9) for b in (one, several)]
    for n, v in together.items():
        torch.testing.assert_close(v, apart[0][n] + apart[1][n], rtol=1e-4, atol=1e-7, msg=n)


def test_one_clipping_module_serves_many_devices_as_fresh_ones_would(conformer):
    """A simulation actor reuses one wrapped module for every device it serves: each device's sum must
    be what a fresh module gives at that device's weights -- breaks if the shared weights are not
    reloaded, or if a per-sample buffer (grad_sample, summed_grad, activations an interrupted call
    left) from one device reaches the next."""
    level = fedsgd(c=0.05, q=0.5, steps=2)
    shared = ClippingModule(conformer)
    a = tiny_global().to_torch_state_dict()
    b = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in a.items()}
    devices = [(a, fake_examples(5), Secret(bytes([1]) * 32)), (b, fake_examples(7), Secret(bytes([2]) * 32)),
               (a, fake_examples(4), Secret(bytes([3]) * 32))]
    for weights, examples, secret in devices:
        fresh = level.clipped_sum(weights, ClippingModule(conformer), examples, SampleAccount(), secret, 1)
        reused = level.clipped_sum(weights, shared, examples, SampleAccount(), secret, 1)
        for k in fresh:
            assert torch.equal(reused[k], fresh[k]), k
        # a device whose call fails after its forward (activations captured, no backward) ...
        gs = shared._at(weights)
        conformer.losses(gs, conformer.collate(examples[:2]))
        assert any(getattr(m, "activations", None) for m in gs.modules())
        for p in gs.parameters():
            if p.requires_grad:
                p.grad_sample = torch.ones((2, *p.shape))
    # ... leaves nothing for the next device
    after = level.clipped_sum(a, shared, devices[0][1], SampleAccount(), devices[0][2], 1)
    first = level.clipped_sum(a, ClippingModule(conformer), devices[0][1], SampleAccount(), devices[0][2], 1)
    for k in first:
        assert torch.equal(after[k], first[k]), k


def test_a_shipped_clipping_module_is_the_processs_own(conformer):
    """A simulation unpickles the ClientApp for every message: its clipping module must come back as the
    process's one module for that recognizer, wrapped model included, not as a new one to wrap again."""
    module = ClippingModule.of(conformer)
    assert ClippingModule.of(conformer) is module
    fedsgd(q=1.0).clipped_sum(tiny_global().to_torch_state_dict(), module, fake_examples(2), SampleAccount(), KEY, 0)
    wrapped = module._wrapped
    assert wrapped is not None
    rebuild, args = module.__reduce__()
    assert rebuild(*args) is module and module._wrapped is wrapped


def test_a_device_sum_is_projected_onto_the_cap_on_both_sides(conformer):
    level = fedsgd(c=1.0)
    huge = {k: torch.full_like(v, 50.0) for k, v in conformer.shared(conformer.new_module()).items()
            if v.is_floating_point()}
    clipped = level.check_contribution(huge)
    norm = math.sqrt(sum(float(v.double().pow(2).sum()) for v in clipped.values()))
    assert norm <= level.sum_cap * (1 + 1e-6) and level.sum_cap == 1.0 * 2 * 6  # C x steps x max(4, 3 x 8 / 4)


def test_central_noise_is_added_once_to_the_total_then_divided_by_the_public_batch():
    """Breaks if the noise std, its stream, the divisor or the sign (descent) change."""
    level = fedsgd(z=0.7, c=2.0, steps=3, expected_batch=64.0)
    reference = {"w": torch.zeros(200_000)}
    empty = level.aggregate([], reference, KEY, server_round=5)  # no contribution: noise alone, still released
    assert float(empty["w"].std()) == pytest.approx(level.total_std / (3 * 64.0), rel=0.01)
    assert level.total_std == pytest.approx(0.7 * 2.0 * math.sqrt(3))
    again = level.aggregate([], reference, KEY, server_round=5)
    other = level.aggregate([], reference, KEY, server_round=6)
    assert torch.equal(empty["w"], again["w"]) and not torch.equal(empty["w"], other["w"])
    signal = level.aggregate([{"w": torch.ones(200_000)}], reference, KEY, server_round=5)
    torch.testing.assert_close(signal["w"] - empty["w"], torch.full((200_000,), -1.0 / (3 * 64.0)))


def test_distributed_shares_sum_to_the_accounted_noise_at_the_threshold(conformer):
    """t devices' shares carry the total's std; fewer would carry less (the threshold SecAgg+ enforces)."""
    level = fedsgd(noise="distributed", z=1.0, c=1.0, steps=2, secure_threshold=4)
    assert level.device_std == pytest.approx(level.total_std / 2.0)
    weights = tiny_global().to_torch_state_dict()
    shares = [level.clipped_sum(weights, ClippingModule(conformer), [], SampleAccount(), Secret(bytes([d]) * 32), 0)
              for d in range(4)]
    total = torch.cat([torch.cat([s[k].flatten() for k in sorted(s)]) for s in [
        {k: sum(s[k] for s in shares) for k in shares[0]}]])
    assert float(total.std()) == pytest.approx(level.total_std, rel=0.05)
    # the server adds nothing more: the decoded total is only scaled
    scaled = level.aggregate([{k: sum(s[k] for s in shares) for k in shares[0]}],
                             {k: v for k, v in shares[0].items()}, KEY, 1)
    for k in scaled:
        torch.testing.assert_close(scaled[k], -sum(s[k] for s in shares) / (2 * level.expected_batch))


def test_the_wire_carries_every_parameter_and_a_device_refuses_a_message_without_them():
    level = fedsgd(noise="distributed", secure_threshold=5)
    policy = SamplePrivacyConfig(delta=1e-6, accountant="rdp")
    back = SampleLevel.from_message(level.to_config(), policy)
    assert (back.noise, back.expected_batch, back.sum_cap, back.noise_cohort) == ("distributed", 8.0, 12.0, 5)
    assert (back.delta, back.accountant) == (1e-6, "rdp")
    back.check_echo(level.echo())
    with pytest.raises(ValueError, match="DP-FedSGD parameters"):
        SampleLevel.from_message({k: v for k, v in level.to_config().items() if k != "sample-sum-cap"}, policy)
    with pytest.raises(ValueError):
        level.check_echo({**level.echo(), "sample-batch": 1.0})
    with pytest.raises(ValueError, match="cohort >= 3"):
        SampleLevel(1.0, 1.0, 0.5, 1, noise="distributed", expected_batch=1.0, sum_cap=1.0, noise_cohort=2)


def test_the_device_policy_decides_which_placements_it_joins():
    """The deployed default refuses central (a clear clipped sum) and a share outside SecAgg+; its floor
    applies to the z of the total."""
    safe = DevicePolicy()
    assert check_mechanism(safe, fedsgd("central"), None).code == P.DECLINED_PLACEMENT
    assert check_mechanism(safe, fedsgd("distributed"), None, secure=False).code == P.DECLINED_PLACEMENT
    assert check_mechanism(safe, fedsgd("distributed"), None, secure=True) is None
    assert check_mechanism(safe, fedsgd("distributed", z=0.4), None, secure=True).code == P.DECLINED_NOISE_FLOOR
    assert check_mechanism(DevicePolicy.permissive(), fedsgd("central"), None) is None


def test_a_device_replies_with_its_clipped_sum_and_only_the_echo(tmp_path):
    """End to end through the ClientApp's train: the reply is the clipped sum (model layout), its metrics
    the mechanism's echo, and the device's ledger holds the round's steps."""
    level = fedsgd(c=0.5, q=0.6, steps=2)
    settings = DeviceSettings(TINY, TrainConfig(local_steps=2, batch_size=2), SamplePrivacyConfig(noise="central"),
                              None, seed=0, policy=DevicePolicy.permissive())
    store = OneDevice(tmp_path, fake_examples(5))
    from fl.model.conformer import ConformerRecognizer
    msg, ctx = train_message(1, level.to_config(), nonce="n")
    reply = client_app._train(settings, msg, ctx, store, ConformerRecognizer(TINY))
    metrics = dict(reply.content[P.METRICS])
    assert metrics == level.echo()
    update = reply.content[P.ARRAYS].to_torch_state_dict()
    norm = math.sqrt(sum(float(v.double().pow(2).sum()) for v in update.values()))
    assert 0 < norm <= level.sum_cap
    from clients.state import DeviceState
    account = DeviceState(tmp_path).account("pld")
    assert account.history == [(level.noise_multiplier, level.sample_rate, 2)]
    assert account.epsilon(1e-5) == pytest.approx(sample_level_epsilon([(level.noise_multiplier, 0.6, 2)], 1e-5))


def test_the_server_projects_every_clear_sum_drops_bad_ones_and_steps_with_the_noised_mean(tmp_path, task_identity):
    """A device's huge sum moves the model by at most its cap; NaN, wrong shapes and a wrong echo are
    dropped; the round's step is -(total + noise) / (steps B) through the server optimizer."""
    from fl.config import FederationConfig
    from fl.privacy.gaussian import update_norm
    from server.server_app import run_server
    from tests.test_attacks import FakeGrid, _final, _honest, _set, _settings

    handlers = {1: _honest(1e-3), 2: _honest(1e-3), 20: _honest(1e-3, _set("huge", None)),
                10: _honest(1e-3, _set("nan", None)), 11: _honest(1e-3, _set("shape", None)),
                12: _honest(1e-3, _set("sample-batch", 1.0))}
    sample = SamplePrivacyConfig(noise="central", noise_multiplier=1e-6, max_grad_norm=0.01, sample_rate=0.5,
                                 expected_batch=4.0)
    s = _settings(tmp_path, nodes=handlers, sample=sample,
                  federation=FederationConfig(server_optimizer="fedavg", server_lr=1.0))
    rows = run_server(FakeGrid(handlers), s)
    assert [(r.clients, r.rejected) for r in rows[1:]] == [(3, 3), (3, 3)]
    level = SampleLevel.from_config(sample, s.train, s.rounds, len(handlers))
    start = torch.load(s.initial_weights, weights_only=False)["state_dict"]
    moved = update_norm({k: _final(tmp_path)[k] - start[k] for k in start if start[k].is_floating_point()})
    honest = 2 * 1e-3 * math.sqrt(sum(v.numel() for v in start.values() if v.is_floating_point()))
    per_round = (level.sum_cap + honest) / (level.steps * level.expected_batch)
    assert level.sum_cap / (level.steps * level.expected_batch) < moved <= 2 * per_round * 1.01
    summary = (tmp_path / "run" / "summary.json").read_text()
    assert '"noise": "central"' in summary and '"device_sampling_credit": false' in summary
