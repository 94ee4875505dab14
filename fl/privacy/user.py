"""User-level (device-level) differential privacy: the mechanisms of DP-FedAvg.

Guarantee. One round of DP-FedAvg releases the noised sum of the cohort's bounded contributions

    S = sum_{i in cohort} clip(Delta_i, C) + N(0, (z C)^2 I),

(the caller divides S by a public constant, such as the expected cohort size, never by a data-
dependent count). Each device's contribution has L2 norm <= C (``clip_update`` / ``per_layer_clip``
ensure it exactly, float error included; updates are summed unweighted), so adding or removing
one device -- or zeroing out its contribution -- moves S by at most C in L2: one round is the
Gaussian mechanism with noise multiplier z with respect to a device's whole data set. Over rounds
it composes as accounted in ``fl.privacy.accounting`` (subsampled Gaussian only if the cohort is
really Poisson-sampled). Everything a device sends must go through these mechanisms: a device whose
update is released unclipped or unnoised voids the guarantee for everyone in the round.

Noise placement changes whom a device must trust, not the guarantee of the released sum:
  * ``central``: devices send clipped, un-noised updates; the server adds N(0, (zC)^2) to the sum.
    Devices trust the server (the guarantee holds for everything released after aggregation).
  * ``local``: each device adds N(0, (zC)^2) itself, so each single update is already z-Gaussian
    against anyone who sees it (the server included); the sum is sqrt(cohort) times noisier.
  * ``distributed``: each device adds N(0, (zC)^2 / cohort); with secure aggregation only the sum
    is seen, and its noise has std zC -- provided at least ``cohort`` devices add their share. If
    devices drop out the noise shrinks, so pass the minimum number of devices that will survive.

Floating-point noise samples leak through their low-order bits (Mironov 2012; Holohan & Braghin
2021); ``secure=True`` uses Opacus' mitigation with a generator seeded from the OS's CSPRNG.
"""

from __future__ import annotations

import logging
import math
import secrets
from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

import torch
from opacus.optimizers.optimizer import _generate_noise
from torch import Tensor

log = logging.getLogger(__name__)

NoisePlacement = Literal["central", "local", "distributed"]
NOISE_PLACEMENTS: tuple[str, ...] = ("central", "local", "distributed")
_EPS64 = torch.finfo(torch.float64).eps


def _check_floating(delta: Mapping[str, Tensor]) -> None:
    for name, t in delta.items():
        if not t.is_floating_point():
            raise ValueError(
                f"update tensor {name!r} has dtype {t.dtype}: user-level DP covers floating-point "
                "parameters only; pass the deltas of the trainable parameters"
            )


def _check_positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_nonnegative(name: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _check_int(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _layer_norms(delta: Mapping[str, Tensor]) -> dict[str, float]:
    """L2 norm of every tensor, accumulated in float64."""
    _check_floating(delta)
    return {
        name: float(torch.linalg.vector_norm(t.detach(), dtype=torch.float64))
        for name, t in delta.items()
    }


def update_norm(delta: Mapping[str, Tensor]) -> float:
    """Global L2 norm of an update: the norm of all its tensors flattened into one vector.

    Accumulated in float64, so it is the reference the clipping bounds below are checked against.
    """
    return math.hypot(*_layer_norms(delta).values())


def _clip_scale(norm: float, bound: float, tensors: Sequence[Tensor], what: str) -> float:
    """The factor that brings ``norm`` to at most ``bound`` after rounding to the tensors' dtypes.

    1.0 when ``norm <= bound`` (the tensors stay bit-identical), else ``bound / (norm (1 + m))``
    with the margin m = (largest machine epsilon of the dtypes) + 2 n eps64 (n elements): the
    scaling is done in float64 and rounding back to a dtype grows each element by at most eps/2
    relatively, and the float64 norm (here and when checked) errs by less than n eps64 relatively,
    so the result's norm is below ``bound``, and above ``bound (1 - 2 m)``.
    """
    if not math.isfinite(norm):
        raise ValueError(
            f"{what} has a non-finite norm ({norm}); it cannot be clipped: drop this update "
            "(do not send it) and check the local training for divergence"
        )
    if norm <= bound:
        return 1.0
    numel = sum(t.numel() for t in tensors)
    margin = max(torch.finfo(t.dtype).eps for t in tensors) + 2 * numel * _EPS64
    return bound / (norm * (1.0 + margin))


def _scaled(t: Tensor, scale: float) -> Tensor:
    if scale == 1.0:
        return t.detach().clone()
    return (t.detach().to(torch.float64) * scale).to(t.dtype)


def clip_update(delta: Mapping[str, Tensor], clip_norm: float) -> tuple[dict[str, Tensor], float]:
    """Flat L2 clipping of a whole model update to ``clip_norm`` (McMahan et al. 2018).

    Returns ``(clipped copy, pre-clip norm)``. Guarantee: ``update_norm(clipped) <= clip_norm``
    exactly, for any finite update (float rounding included); an update already within the bound
    is returned unchanged (bit-identical copy). The input is not modified. Raises ``ValueError``
    for a non-finite norm, which no scaling can bound.
    """
    _check_positive("clip_norm", clip_norm)
    norm = update_norm(delta)
    scale = _clip_scale(norm, clip_norm, list(delta.values()), "the update")
    return {name: _scaled(t, scale) for name, t in delta.items()}, norm


def layer_clip_norms(
    names: Sequence[str], clip_norm: float, weights: Mapping[str, float] | None = None
) -> dict[str, float]:
    """Per-layer bounds C_l with sum_l C_l^2 = C^2: equal (C / sqrt(L)), or C_l proportional to
    ``weights[l]`` (for example ``sqrt(numel)``, which makes C_l^2 proportional to the layer size).
    """
    _check_positive("clip_norm", clip_norm)
    if not names:
        return {}
    if weights is None:
        w = {name: 1.0 for name in names}
    else:
        if set(weights) != set(names):
            missing, extra = set(names) - set(weights), set(weights) - set(names)
            raise ValueError(
                f"per-layer weights must name exactly the update's tensors "
                f"(missing: {sorted(missing)}, extra: {sorted(extra)})"
            )
        for name in names:
            _check_positive(f"weight of {name!r}", float(weights[name]))
        w = {name: float(weights[name]) for name in names}
    total = math.hypot(*w.values())
    return {name: clip_norm * w[name] / total for name in names}


def per_layer_clip(
    delta: Mapping[str, Tensor], clip_norm: float, weights: Mapping[str, float] | None = None
) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Per-layer L2 clipping (McMahan et al. 2018; Pelikan et al. 2023): layer l to C_l.

    The bounds come from ``layer_clip_norms`` (sum of C_l^2 = C^2), so the whole update's norm is
    at most C and its sensitivity -- hence the noise z*C and the accounting -- is the same as with
    flat clipping. Returns ``(clipped copy, pre-clip norm of every layer)``. Guarantee: each
    clipped layer's norm is <= its C_l (float rounding included), a layer already within its bound
    is unchanged, and the input is not modified.
    """
    bounds = layer_clip_norms(list(delta), clip_norm, weights)
    norms = _layer_norms(delta)
    clipped = {
        name: _scaled(t, _clip_scale(norms[name], bounds[name], [t], f"layer {name!r}"))
        for name, t in delta.items()
    }
    return clipped, norms


def gaussian_noise_like(
    delta: Mapping[str, Tensor],
    std: float,
    generator: torch.Generator | None = None,
    secure: bool = False,
) -> dict[str, Tensor]:
    """I.i.d. N(0, std^2) noise shaped like ``delta`` (same names, shapes, dtypes, devices).

    Samples are drawn in float32 (float64 for float64 tensors) on the generator's device and then
    moved, so a CPU generator gives the same noise whatever the tensors' device. ``generator=None``
    uses torch's global RNG. ``secure=True`` uses Opacus' floating-point-attack-resistant sampling
    (``_generate_noise(secure_mode=True)``: a sum of four Gaussians, halved) with a fresh generator
    seeded with 64 bits from ``secrets`` on every call; a generator cannot be passed then. The
    generator itself is torch's, not a CSPRNG: for cryptographic strength, Opacus uses torchcsprng.
    """
    _check_nonnegative("noise std", std)
    if secure and generator is not None:
        raise ValueError("secure noise seeds its own generator from the OS; pass generator=None")
    _check_floating(delta)
    secure_generators: dict[torch.device, torch.Generator] = {}
    out: dict[str, Tensor] = {}
    for name, t in delta.items():
        if secure:
            if t.device not in secure_generators:
                gen = torch.Generator(device=t.device)
                gen.manual_seed(secrets.randbits(64))
                secure_generators[t.device] = gen
            gen, device = secure_generators[t.device], t.device
        else:
            gen, device = generator, generator.device if generator is not None else t.device
        dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
        reference = torch.empty(t.shape, dtype=dtype, device=device)
        noise = _generate_noise(std, reference, generator=gen, secure_mode=secure)
        out[name] = noise.to(device=t.device, dtype=t.dtype)
    return out


def _check_placement(noise: str) -> None:
    if noise not in NOISE_PLACEMENTS:
        raise ValueError(f"noise placement must be one of {NOISE_PLACEMENTS}, got {noise!r}")


def noise_std_per_device(
    noise: NoisePlacement | str, noise_multiplier: float, clip_norm: float, cohort: int
) -> float:
    """Std of the Gaussian noise each device adds to its clipped update.

    ``central``: 0 (the server adds ``server_noise_std``). ``local``: z*C. ``distributed``:
    z*C / sqrt(cohort), so that the sum of ``cohort`` independent shares has std exactly z*C: pass
    the minimum number of devices guaranteed to contribute (dropouts reduce the total noise).
    In every case the noise on the released sum has std >= z*C, which is what is accounted.
    """
    _check_placement(noise)
    _check_nonnegative("noise_multiplier", noise_multiplier)
    _check_positive("clip_norm", clip_norm)
    _check_int("cohort", cohort, 1)
    if noise == "central":
        return 0.0
    if noise == "local":
        return noise_multiplier * clip_norm
    return noise_multiplier * clip_norm / math.sqrt(cohort)


def server_noise_std(
    noise: NoisePlacement | str, noise_multiplier: float, clip_norm: float
) -> float:
    """Std of the noise the server adds to the sum: z*C for ``central``, 0 otherwise."""
    _check_placement(noise)
    _check_nonnegative("noise_multiplier", noise_multiplier)
    _check_positive("clip_norm", clip_norm)
    return noise_multiplier * clip_norm if noise == "central" else 0.0


@dataclass
class AdaptiveClipNorm:
    """Quantile-based adaptive clipping (Andrew et al. 2021, "Differentially Private Learning with
    Adaptive Clipping"): the clip norm follows the ``target_quantile`` of the devices' update norms.

    Each round, every device clips with the current ``clip_norm`` and also reports the bit
    ``indicator(pre-clip norm)``; the server releases a noised count of those bits and moves the
    clip norm geometrically. The bit is itself a query on the device's data: it is private only if
    the count is noised with ``count_noise_multiplier`` (sigma_b, the std of the noise on the *sum*
    of bits; Andrew et al. suggest expected cohort / 20) and the accounting pays for it -- see
    ``effective_noise_multiplier``. With sigma_b = 0 the clip norm leaks and no DP claim holds.
    """

    clip_norm: float
    target_quantile: float = 0.5
    learning_rate: float = 0.2
    count_noise_multiplier: float = 0.0

    def __post_init__(self) -> None:
        _check_positive("clip_norm", self.clip_norm)
        if not 0.0 < self.target_quantile < 1.0:
            raise ValueError(f"target_quantile must be in (0, 1), got {self.target_quantile!r}")
        _check_nonnegative("learning_rate", self.learning_rate)
        _check_nonnegative("count_noise_multiplier", self.count_noise_multiplier)

    def indicator(self, norm: float) -> float:
        """The bit a device reports: 1.0 if its pre-clip norm is <= ``clip_norm``, else 0.0."""
        return 1.0 if norm <= self.clip_norm else 0.0

    def update(
        self,
        bits_sum: float,
        cohort: int,
        generator: torch.Generator | None = None,
        *,
        noise: NoisePlacement | str = "central",
        reports: int | None = None,
    ) -> float:
        """Move the clip norm from one round's bits; returns (and stores) the new ``clip_norm``.

        b = (bits_sum - reports/2 + N(0, sigma_b^2)) / cohort + 1/2, then
        C <- C * exp(-learning_rate * (b - target_quantile)).
        ``cohort`` is the public denominator (the expected cohort size); ``reports`` is how many
        bits ``bits_sum`` adds up (default: ``cohort``, giving Andrew et al.'s
        b = (bits_sum + N(0, sigma_b^2)) / cohort). Centring on ``reports`` makes b depend on the
        data only through sum(bit_i - 1/2), whose sensitivity is 1/2 -- what
        ``effective_noise_multiplier`` assumes -- also when the cohort size varies.
        ``noise`` says who adds the count's noise: the server here for ``central``; for ``local``
        or ``distributed`` the devices have already noised their bits (each with
        ``noise_std_per_device(noise, count_noise_multiplier, 1.0, cohort)``) and none is added.
        """
        std = server_noise_std(noise, self.count_noise_multiplier, 1.0)
        _check_int("cohort", cohort, 1)
        n = cohort if reports is None else reports
        _check_int("reports", n, 0)
        if not math.isfinite(bits_sum) or (noise == "central" and not 0 <= bits_sum <= n):
            raise ValueError(f"bits_sum {bits_sum!r} is not a sum of {n} bits")
        noisy = bits_sum - n / 2
        if std > 0:
            draw = torch.normal(0.0, std, size=(1,), generator=generator, dtype=torch.float64)
            noisy += float(draw)
        fraction = noisy / cohort + 0.5
        self.clip_norm *= math.exp(-self.learning_rate * (fraction - self.target_quantile))
        log.debug("adaptive clipping: noisy fraction %.4f, new C %.6g", fraction, self.clip_norm)
        return self.clip_norm

    def effective_noise_multiplier(self, z_total: float) -> float:
        """Noise multiplier left for the updates when one budget pays for updates and count.

        z_update = (z_total^-2 - (2 sigma_b)^-2)^(-1/2) (Andrew et al. 2021, Thm. 1): the updates
        (sensitivity C, noise z_update*C) and the centred count (sensitivity 1/2, noise sigma_b)
        together are one Gaussian mechanism with noise multiplier z_total. Add z_update*C to the
        updates and account every round with ``z_total`` (``UserLevelSpec(noise_multiplier=
        z_total, ...)``), never with z_update. Raises ``ValueError`` unless 2 sigma_b > z_total.
        """
        _check_positive("z_total", z_total)
        two_sigma_b = 2.0 * self.count_noise_multiplier
        if two_sigma_b <= z_total:
            raise ValueError(
                f"count_noise_multiplier {self.count_noise_multiplier} is too small for a total "
                f"noise multiplier of {z_total}: it must exceed z_total / 2 = {z_total / 2} "
                "(Andrew et al. suggest expected cohort / 20)"
            )
        return (z_total**-2 - two_sigma_b**-2) ** -0.5
