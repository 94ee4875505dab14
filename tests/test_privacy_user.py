"""User-level DP mechanisms: clipping bounds hold exactly, noise has the stated std, the adaptive
clip norm tracks its quantile, and weights keep the sensitivity."""

import math
import random

import pytest
import torch

from fl.privacy.gaussian import (
    AdaptiveClipNorm,
    clip_update,
    gaussian_noise_like,
    layer_clip_norms,
    noise_norm_bound,
    per_layer_clip,
    update_norm,
)
from fl.privacy.randomness import Secret, Stream
from fl.privacy.user import UserRound

SHAPES = {"enc.weight": (17, 9), "enc.bias": (17,), "head.weight": (5, 3, 4), "scale": ()}


def _stream(seed: int) -> Stream:
    """A pinned secret stream (tests only: a fixed key)."""
    return Secret.from_seed(seed, "test").stream("noise")


def _update(seed: int, dtype=torch.float32, scale: float = 1.0, heavy: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, (name, shape) in enumerate(SHAPES.items()):
        t = torch.randn(shape, generator=g, dtype=torch.float64)
        if heavy:  # layers of wildly different magnitudes
            t = t * 10.0 ** (3 * i - 4)
        out[name] = (t * scale).to(dtype)
    return out


def _flat_norm64(delta) -> float:
    return float(torch.cat([t.double().flatten() for t in delta.values()]).norm())


def test_update_norm_is_the_norm_of_the_flattened_update():
    d = _update(0)
    assert update_norm(d) == pytest.approx(_flat_norm64(d), rel=1e-12)
    assert update_norm({}) == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_clipped_norm_never_exceeds_the_bound(dtype):
    rng = random.Random(0)
    wide = dtype in (torch.float32, torch.float64)
    for trial in range(300):
        scale = 10.0 ** rng.uniform(-25, 25) if wide else 10.0 ** rng.uniform(-2, 2)
        clip = 10.0 ** rng.uniform(-3, 3) if wide else 10.0 ** rng.uniform(-1, 1)
        d = _update(trial, dtype, scale, heavy=wide and trial % 2 == 0)
        clipped, norm = clip_update(d, clip)
        assert norm == update_norm(d)
        after = update_norm(clipped)
        assert after <= clip, (trial, scale, clip, after)
        assert _flat_norm64(clipped) <= clip * (1 + 1e-12)
        if norm > clip:  # clipped onto the sphere (up to rounding), direction kept
            assert after >= clip * (1 - max(4 * torch.finfo(dtype).eps, 1e-9))
            for name, t in clipped.items():
                assert t.dtype == dtype and t.shape == d[name].shape
            ratio = float(torch.cat([t.double().flatten() for t in clipped.values()]).norm())
            dot = sum(float((clipped[k].double() * d[k].double()).sum()) for k in d)
            assert dot / (ratio * norm) > 1 - 1e-2


def test_small_updates_are_returned_unchanged_and_inputs_untouched():
    d = _update(1)
    before = {k: v.clone() for k, v in d.items()}
    norm = update_norm(d)
    clipped, pre = clip_update(d, norm)  # exactly on the bound: not clipped
    assert pre == norm
    for k in d:
        assert torch.equal(clipped[k], d[k]) and clipped[k] is not d[k]
    clip_update(d, norm / 10)
    per_layer_clip(d, norm / 10)
    for k in d:
        assert torch.equal(d[k], before[k])


def test_clip_rejects_what_it_cannot_bound():
    d = _update(2)
    d["enc.bias"][3] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        clip_update(d, 1.0)
    with pytest.raises(ValueError, match="floating-point"):
        clip_update({"steps": torch.tensor([3])}, 1.0)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="clip_norm"):
            clip_update(_update(3), bad)


def test_layer_bounds_split_the_total_budget():
    names = list(SHAPES)
    equal = layer_clip_norms(names, 2.0)
    assert all(c == pytest.approx(2.0 / math.sqrt(len(names))) for c in equal.values())
    weights = {k: math.sqrt(max(1, math.prod(s))) for k, s in SHAPES.items()}
    prop = layer_clip_norms(names, 2.0, weights)
    assert math.hypot(*prop.values()) == pytest.approx(2.0, rel=1e-12)
    assert prop["enc.weight"] / prop["enc.bias"] == pytest.approx(3.0)  # sqrt(153 / 17)
    with pytest.raises(ValueError, match="missing"):
        layer_clip_norms(names, 1.0, {"enc.weight": 1.0})
    with pytest.raises(ValueError, match="weight of"):
        layer_clip_norms(names, 1.0, {**weights, "scale": 0.0})


@pytest.mark.parametrize("weighted", [False, True])
def test_per_layer_clipping_bounds_every_layer_and_the_total(weighted):
    rng = random.Random(1)
    for trial in range(200):
        d = _update(trial, scale=10.0 ** rng.uniform(-6, 6), heavy=trial % 3 == 0)
        clip = 10.0 ** rng.uniform(-2, 2)
        weights = {k: math.sqrt(t.numel()) for k, t in d.items()} if weighted else None
        bounds = layer_clip_norms(list(d), clip, weights)
        clipped, norms = per_layer_clip(d, clip, weights)
        assert update_norm(clipped) <= clip
        for k, t in clipped.items():
            assert norms[k] == update_norm({k: d[k]})
            assert update_norm({k: t}) <= bounds[k]
            if norms[k] <= bounds[k]:
                assert torch.equal(t, d[k])


def test_gaussian_noise_has_the_requested_std():
    ref = {"a": torch.zeros(200, 250), "b": torch.zeros(50_000, dtype=torch.float64)}
    for secure in (False, True):
        noise = gaussian_noise_like(ref, 0.7, _stream(0), secure=secure)
        flat = torch.cat([t.double().flatten() for t in noise.values()])
        assert flat.numel() == 100_000
        assert float(flat.std()) == pytest.approx(0.7, rel=0.02)
        assert abs(float(flat.mean())) < 5 * 0.7 / math.sqrt(flat.numel())
        assert {k: (t.shape, t.dtype) for k, t in noise.items()} == {
            k: (t.shape, t.dtype) for k, t in ref.items()
        }


def test_noise_is_a_function_of_the_stream_in_both_modes():
    ref = {"w": torch.zeros(64, dtype=torch.bfloat16), "v": torch.zeros(3, 3)}
    for secure in (False, True):
        a = gaussian_noise_like(ref, 1.0, _stream(5), secure=secure)
        b = gaussian_noise_like(ref, 1.0, _stream(5), secure=secure)
        c = gaussian_noise_like(ref, 1.0, _stream(6), secure=secure)
        assert all(torch.equal(a[k], b[k]) for k in ref) and not torch.equal(a["v"], c["v"])
    plain = gaussian_noise_like(ref, 1.0, _stream(5))
    secure = gaussian_noise_like(ref, 1.0, _stream(5), secure=True)
    assert not torch.equal(plain["v"], secure["v"])  # the mitigation draws differently
    assert all(not t.any() for t in gaussian_noise_like(ref, 0.0, _stream(0)).values())
    with pytest.raises(ValueError, match="std"):
        gaussian_noise_like(ref, -1.0, _stream(0))


def test_noise_norm_bound_holds_for_honest_noise_and_is_not_loose():
    std, numel = 0.3, 10_000
    g = _stream(0)
    norms = [update_norm(gaussian_noise_like({"x": torch.zeros(numel)}, std, g)) for _ in range(50)]
    bound = noise_norm_bound(std, numel)
    assert max(norms) < bound < 1.1 * std * math.sqrt(numel)
    assert noise_norm_bound(std, numel, 1e-3) < bound and noise_norm_bound(0.0, numel) == 0.0


def test_noise_placements_give_the_same_noise_on_the_sum():
    z, c, m = 1.3, 0.5, 16
    assert UserRound(z, c, 0).device_std == 0.0  # central: the server adds z*C to the sum
    assert UserRound(z, c, 1).device_std == pytest.approx(z * c)
    assert UserRound(z, c, m).device_std * math.sqrt(m) == pytest.approx(z * c)
    # Empirically: the sum of the cohort's distributed shares has std z*C.
    g = _stream(3)
    share = UserRound(z, c, m).device_std
    total = sum(gaussian_noise_like({"x": torch.zeros(20_000)}, share, g)["x"] for _ in range(m))
    assert float(total.std()) == pytest.approx(z * c, rel=0.03)
    with pytest.raises(ValueError, match="noise cohort"):
        UserRound(z, c, -1)
    with pytest.raises(ValueError, match="clipping"):
        UserRound(z, c, 0, "server")


def _quiet(start: float = 1.0, **kw) -> AdaptiveClipNorm:
    """Adaptive clipping with negligible count noise (it must be > 0)."""
    return AdaptiveClipNorm(start, count_noise_multiplier=1e-12, **kw)


def test_adaptive_clip_moves_against_the_fraction_below():
    g = _stream(0)
    below = _quiet(target_quantile=0.5, learning_rate=0.2)
    assert below.update(3.0, 3, g, reports=3) == pytest.approx(math.exp(-0.2 * 0.5))
    above = _quiet(target_quantile=0.5, learning_rate=0.2)
    assert above.update(0.0, 3, g, reports=3) == pytest.approx(math.exp(0.1))
    assert above.clip_norm == pytest.approx(math.exp(0.1))
    # Centring on the number of reports: 2 of 4 reports below, public cohort 5.
    centred = _quiet(learning_rate=1.0)
    b = (2 - 4 / 2) / 5 + 0.5
    assert centred.update(2.0, 5, g, reports=4) == pytest.approx(math.exp(-(b - 0.5)))
    with pytest.raises(ValueError, match="bits"):
        centred.update(6.0, 5, g, reports=5)


@pytest.mark.parametrize("quantile,start", [(0.5, 0.01), (0.8, 10.0), (0.2, 1.0)])
def test_adaptive_clip_converges_to_the_target_quantile(quantile, start):
    dist = torch.distributions.LogNormal(0.0, 0.5)
    torch.manual_seed(0)
    g = _stream(0)
    clip = AdaptiveClipNorm(start, target_quantile=quantile, learning_rate=0.2, count_noise_multiplier=1.0)
    for _ in range(100):
        norms = dist.sample((500,))
        clip.update(float((norms <= clip.clip_norm).sum()), len(norms), g, reports=len(norms))
    true_quantile = float(dist.icdf(torch.tensor(quantile)))
    assert clip.clip_norm == pytest.approx(true_quantile, rel=0.1)


def test_adaptive_clip_count_noise_comes_from_the_stream():
    a = AdaptiveClipNorm(1.0, count_noise_multiplier=5.0)
    b = AdaptiveClipNorm(1.0, count_noise_multiplier=5.0)
    ca = a.update(10.0, 20, _stream(1), reports=20)
    cb = b.update(10.0, 20, _stream(1), reports=20)
    assert ca == cb != 1.0  # noiseless it would stay at 1.0 (fraction 1/2 = target)
    with pytest.raises(ValueError, match="count_noise_multiplier"):
        AdaptiveClipNorm(1.0, count_noise_multiplier=0.0)  # a noiseless count would release the bits' sum exactly


def test_effective_noise_multiplier():
    clip = AdaptiveClipNorm(1.0, count_noise_multiplier=1.0)
    z_update = clip.effective_noise_multiplier(1.0)
    assert z_update == pytest.approx(1 / math.sqrt(0.75))
    # Composition: the update and the count together are one Gaussian with z_total.
    for z in (0.3, 1.0, 1.9):
        zu = clip.effective_noise_multiplier(z)
        assert zu**-2 + (2 * 1.0) ** -2 == pytest.approx(z**-2)
        assert zu > z
    for z in (2.0, 3.0):
        with pytest.raises(ValueError, match="too small"):
            clip.effective_noise_multiplier(z)
    with pytest.raises(ValueError, match="target_quantile"):
        AdaptiveClipNorm(1.0, target_quantile=1.0, count_noise_multiplier=1.0)
