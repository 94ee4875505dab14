"""The server optimizer (server/optimizer.py): FedAvg, FedAvgM, FedAdam and FedYogi steps against
torch's own optimizers and hand-computed values, exact resumes from its state, and its checks."""

import io
import math

import pytest
import torch

from fl.config import SERVER_OPTIMIZERS, FederationConfig, SamplePrivacyConfig, UserPrivacyConfig
from server.optimizer import FEDSGD_DEFAULT, USER_LEVEL_DEFAULT, ServerOptimizer


def _randn(*shape: int, seed: int = 1, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _deltas(n: int, shape=(3, 4), dtype=torch.float64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randn(shape, generator=g, dtype=dtype) for _ in range(n)]


def _torch_run(make_opt, x0: torch.Tensor, deltas: list[torch.Tensor]) -> torch.Tensor:
    """``x0`` after torch's optimizer took a step with grad = -delta for each delta."""
    p = torch.nn.Parameter(x0.clone())
    opt = make_opt([p])
    for d in deltas:
        p.grad = -d
        opt.step()
    return p.detach()


def _ours(opt: ServerOptimizer, x0: torch.Tensor, deltas: list[torch.Tensor]) -> torch.Tensor:
    arrays = {"w": x0.clone()}
    for d in deltas:
        arrays = opt.step(arrays, {"w": d})
    return arrays["w"]


def test_fedavg_lr_1_is_plain_fedavg_bit_for_bit():
    x, (d,) = _randn(5, 7, dtype=torch.float32), _deltas(1, (5, 7), torch.float32)
    out = ServerOptimizer("fedavg").step({"w": x}, {"w": d})
    assert out["w"].dtype == torch.float32
    assert torch.equal(out["w"], (x.double() + d.double()).to(torch.float32))


def test_fedavg_lr_half_halves_the_step():
    x, (d,) = torch.zeros(3, 4, dtype=torch.float64), _deltas(1)
    out = ServerOptimizer("fedavg", lr=0.5).step({"w": x}, {"w": d})
    assert torch.equal(out["w"] - x, 0.5 * d)


def test_fedavgm_matches_torch_sgd_momentum():
    x0, deltas = _randn(3, 4), _deltas(6)
    expected = _torch_run(lambda ps: torch.optim.SGD(ps, lr=0.3, momentum=0.8, dampening=0), x0, deltas)
    got = _ours(ServerOptimizer("fedavgm", lr=0.3, beta1=0.8), x0, deltas)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_fedadam_matches_torch_adam():
    x0, deltas = _randn(3, 4), _deltas(6)
    expected = _torch_run(lambda ps: torch.optim.Adam(ps, lr=0.05, betas=(0.9, 0.99), eps=1e-3), x0, deltas)
    opt = ServerOptimizer("fedadam", lr=0.05, beta1=0.9, beta2=0.99, tau=1e-3)
    got = _ours(opt, x0, deltas)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    assert not torch.equal(got, x0) and opt.t == 6


def test_fedyogi_two_steps_by_hand():
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    d1, d2 = torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor([0.05, 3.0], dtype=torch.float64)
    yogi = ServerOptimizer("fedyogi", lr, b1, b2, tau)
    got = _ours(yogi, torch.zeros(2, dtype=torch.float64), [d1, d2])
    # step 1 (from m = v = 0): m = [0.1, 0.2], v = [0.01, 0.04]; bias-corrected [1, 2] and [1, 4]
    x1 = [lr * 1 / (1 + tau), lr * 2 / (2 + tau)]
    # step 2: m = 0.9 m + 0.1 d2; Yogi's v: element 0 has d2^2 = 0.0025 < v = 0.01, so v shrinks by
    # 0.01 * 0.0025; element 1 has d2^2 = 9 > v = 0.04, so v grows by 0.01 * 9
    m2, v2 = [0.095, 0.48], [0.01 - 0.01 * 0.0025, 0.04 + 0.01 * 9]
    bc1, bc2 = 1 - b1 ** 2, 1 - b2 ** 2
    x2 = [x1[i] + lr * (m2[i] / bc1) / (math.sqrt(v2[i] / bc2) + tau) for i in range(2)]
    torch.testing.assert_close(got, torch.tensor(x2, dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(yogi.v["w"], torch.tensor(v2, dtype=torch.float64), rtol=1e-12, atol=0)
    adam = ServerOptimizer("fedadam", lr, b1, b2, tau)
    _ours(adam, torch.zeros(2, dtype=torch.float64), [d1, d2])
    # Adam's v at step 2 is 0.99 v + 0.01 d2^2 instead: for d2^2 < v it differs from Yogi's
    adam_v2 = [0.99 * 0.01 + 0.01 * 0.0025, 0.99 * 0.04 + 0.01 * 9]
    torch.testing.assert_close(adam.v["w"], torch.tensor(adam_v2, dtype=torch.float64), rtol=1e-12, atol=0)
    assert abs(float(yogi.v["w"][0]) - float(adam.v["w"][0])) > 1e-5


@pytest.mark.parametrize("name", SERVER_OPTIMIZERS)
def test_state_round_trip_resumes_bit_for_bit(name):
    x0 = {"w": _randn(3, 4, dtype=torch.float32), "b": _randn(4, seed=2, dtype=torch.float32)}
    deltas = _deltas(5, (3, 4), torch.float32)
    updates = [{"w": d, "b": d[0] * 0.5} for d in deltas]
    straight, arrays = ServerOptimizer(name, lr=0.1), dict(x0)
    for u in updates:
        arrays = straight.step(arrays, u)
    first, resumed = ServerOptimizer(name, lr=0.1), dict(x0)
    for u in updates[:3]:
        resumed = first.step(resumed, u)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    second = ServerOptimizer(name, lr=0.1)
    second.load_state_dict(torch.load(buf, weights_only=True))  # plain: no pickled objects
    for u in updates[3:]:
        resumed = second.step(resumed, u)
    assert second.t == 5
    assert all(torch.equal(resumed[k], arrays[k]) for k in x0)


def test_state_of_another_optimizer_is_refused():
    with pytest.raises(ValueError, match="fedadam"):
        ServerOptimizer("fedyogi").load_state_dict(ServerOptimizer("fedadam").state_dict())


def test_non_float_and_unnamed_entries_pass_through():
    count, bias, w = torch.tensor(41, dtype=torch.int64), _randn(3), _randn(2, seed=2)
    arrays = {"w": w, "count": count, "bias": bias}
    out = ServerOptimizer("fedavg").step(arrays, {"w": torch.ones(2), "count": torch.full((), 5.0)})
    assert out is not arrays and out["count"].dtype == torch.int64 and torch.equal(out["count"], count)
    assert torch.equal(out["bias"], bias) and not torch.equal(out["w"], w)
    assert torch.equal(arrays["w"], w)  # the input is not modified


@pytest.mark.parametrize("kwargs", [
    dict(name="sgd"), dict(name="fedadam", lr=0.0), dict(name="fedadam", lr=-1.0),
    dict(name="fedavgm", beta1=1.0), dict(name="fedadam", beta2=-0.1), dict(name="fedyogi", tau=0.0),
])
def test_bad_config_raises(kwargs):
    with pytest.raises(ValueError):
        ServerOptimizer(**kwargs)


def test_from_config():
    fed = FederationConfig(server_optimizer="fedyogi", server_lr=0.3, server_beta1=0.5, server_beta2=0.9,
                           server_tau=1e-2)
    opt = ServerOptimizer.from_config(fed)
    assert (opt.name, opt.lr, opt.beta1, opt.beta2, opt.tau) == ("fedyogi", 0.3, 0.5, 0.9, 1e-2)
    with pytest.raises(ValueError, match="adam"):
        ServerOptimizer.from_config(FederationConfig(server_optimizer="adam"))


def test_each_mechanism_gets_its_default_unless_the_config_names_one():
    """Plain FedAvg without aggregate noise; Adam under DP-FedSGD and under user-level DP (which must
    not hand the noise to the model at lr 1); a named optimizer or rate always wins."""
    fed = FederationConfig()
    assert (ServerOptimizer.from_config(fed).name, ServerOptimizer.from_config(fed).lr) == ("fedavg", 1.0)
    device = ServerOptimizer.from_config(fed, SamplePrivacyConfig(noise="device"))
    assert (device.name, device.lr) == ("fedavg", 1.0)
    central = ServerOptimizer.from_config(fed, SamplePrivacyConfig(noise="central"))
    assert (central.name, central.lr) == FEDSGD_DEFAULT
    user = ServerOptimizer.from_config(fed, None, UserPrivacyConfig())
    assert (user.name, user.lr) == USER_LEVEL_DEFAULT and user.lr < 0.01
    named = ServerOptimizer.from_config(FederationConfig(server_optimizer="fedavg"), None, UserPrivacyConfig())
    assert (named.name, named.lr) == ("fedavg", 1.0)
    rate = ServerOptimizer.from_config(FederationConfig(server_lr=0.02), SamplePrivacyConfig(noise="central"))
    assert (rate.name, rate.lr) == ("fedadam", 0.02)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_update_raises_and_changes_nothing(bad):
    opt, arrays = ServerOptimizer("fedadam"), {"w": torch.zeros(3)}
    opt.step(arrays, {"w": torch.ones(3)})
    before = opt.state_dict()
    with pytest.raises(ValueError, match="not finite"):
        opt.step(arrays, {"w": torch.tensor([1.0, bad, 1.0])})
    assert opt.t == 1 and torch.equal(opt.m["w"], before["m"]["w"]) and torch.equal(opt.v["w"], before["v"]["w"])


def test_bad_key_or_shape_raises():
    opt, arrays = ServerOptimizer("fedavg"), {"w": torch.zeros(3)}
    with pytest.raises(ValueError, match="lacks"):
        opt.step(arrays, {"x": torch.zeros(3)})
    with pytest.raises(ValueError, match="shape"):
        opt.step(arrays, {"w": torch.zeros(4)})


def test_step_overflowing_the_dtype_raises():
    opt, arrays = ServerOptimizer("fedavg"), {"w": torch.full((2,), 60000.0, dtype=torch.float16)}
    with pytest.raises(ValueError, match="non-finite"):
        opt.step(arrays, {"w": torch.full((2,), 60000.0, dtype=torch.float16)})
    assert opt.t == 0
