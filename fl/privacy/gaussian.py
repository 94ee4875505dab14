"""The parts of the Gaussian mechanism on whole model updates: norms, clipping, noise, bounds.

Guarantees stated by each function: ``clip_update`` and ``per_layer_clip`` bound an update's L2
norm exactly (float rounding included), ``gaussian_noise_like`` draws i.i.d. N(0, std^2) from the
ChaCha20 stream it is given (a secret stream, ``fl/privacy/randomness.py``), ``noise_norm_bound`` bounds
the norm of such noise but for a stated probability, and ``AdaptiveClipNorm`` moves the clip
norm from a noised count of clip bits. The user-level mechanism that composes them,
and the guarantee it gives, is ``fl/privacy/user.py``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor

from fl.privacy.randomness import Stream

log = logging.getLogger(__name__)
_EPS64 = torch.finfo(torch.float64).eps


def check_floating(delta: Mapping[str, Tensor]) -> None:
    for name, t in delta.items():
        if not t.is_floating_point():
            raise ValueError(
                f"update tensor {name!r} has dtype {t.dtype}: user-level DP covers floating-point "
                "parameters only; pass the deltas of the trainable parameters"
            )


def check_positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_nonnegative(name: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_int(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _layer_norms(delta: Mapping[str, Tensor]) -> dict[str, float]:
    """L2 norm of every tensor, accumulated in float64."""
    check_floating(delta)
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
    check_positive("clip_norm", clip_norm)
    norm = update_norm(delta)
    scale = _clip_scale(norm, clip_norm, list(delta.values()), "the update")
    return {name: _scaled(t, scale) for name, t in delta.items()}, norm


def layer_clip_norms(
    names: Sequence[str], clip_norm: float, weights: Mapping[str, float] | None = None
) -> dict[str, float]:
    """Per-layer bounds C_l with sum_l C_l^2 = C^2: equal (C / sqrt(L)), or C_l proportional to
    ``weights[l]`` (for example ``sqrt(numel)``, which makes C_l^2 proportional to the layer size).
    """
    check_positive("clip_norm", clip_norm)
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
            check_positive(f"weight of {name!r}", float(weights[name]))
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


def gaussian_noise_like(delta: Mapping[str, Tensor], std: float, stream: Stream, secure: bool = False
                        ) -> dict[str, Tensor]:
    """I.i.d. N(0, std^2) noise shaped like ``delta`` (same names, shapes, dtypes, devices).

    Drawn from ``stream`` (a secret ChaCha20 stream, ``Secret.stream``) as one float64 vector in
    the mapping's order, then split and rounded to each tensor's dtype. ``secure=True`` adds
    Opacus' floating-point-attack mitigation (a sum of four Gaussians, halved).
    """
    check_nonnegative("noise std", std)
    check_floating(delta)
    return dict(zip(delta, stream.gaussian_like(list(delta.values()), std, secure)))


def noise_norm_bound(std: float, numel: int, failure: float = 1e-9) -> float:
    """A bound that the L2 norm of N(0, std^2 I_numel) exceeds with probability <= ``failure``.

    Gaussian concentration of the norm (a 1-Lipschitz function): P(||g|| > sqrt(d) + t) <= exp(-t^2/2).
    """
    return std * (math.sqrt(numel) + math.sqrt(2.0 * math.log(1.0 / failure)))


def model_delta(trained: Mapping[str, Tensor], base: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``trained - base`` for every floating-point entry (the update a device sends)."""
    return {k: (trained[k] - base[k]).detach().clone() for k in base if base[k].is_floating_point()}


@dataclass
class AdaptiveClipNorm:
    """Quantile-based adaptive clipping (Andrew et al. 2021, "Differentially Private Learning with
    Adaptive Clipping"): the clip norm follows the ``target_quantile`` of the devices' update norms.

    Each round, every device clips with the current ``clip_norm`` and also reports the bit
    ``norm <= clip_norm`` to the (trusted, central-noise) server, which releases a noised count of
    those bits and moves the clip norm geometrically. The bit is itself a query on the device's
    data: it is private only because the count is noised with ``count_noise_multiplier`` (sigma_b,
    the std of the noise on the *sum* of bits; Andrew et al. suggest expected cohort / 20) and the
    accounting pays for it -- see ``effective_noise_multiplier``.
    """

    clip_norm: float
    target_quantile: float = 0.5
    learning_rate: float = 0.2
    count_noise_multiplier: float = 10.0

    def __post_init__(self) -> None:
        check_positive("clip_norm", self.clip_norm)
        if not 0.0 < self.target_quantile < 1.0:
            raise ValueError(f"target_quantile must be in (0, 1), got {self.target_quantile!r}")
        check_nonnegative("learning_rate", self.learning_rate)
        check_positive("count_noise_multiplier", self.count_noise_multiplier)

    def update(self, bits_sum: float, cohort: int, stream: Stream, reports: int) -> float:
        """Move the clip norm from one round's bits; returns (and stores) the new ``clip_norm``.

        b = (bits_sum - reports/2 + N(0, sigma_b^2)) / cohort + 1/2, then
        C <- C * exp(-learning_rate * (b - target_quantile)).
        ``cohort`` is the public denominator (the expected cohort size); ``reports`` is how many
        bits ``bits_sum`` adds up. Centring on ``reports`` makes b depend on the data only through
        sum(bit_i - 1/2), whose sensitivity is 1/2 -- what ``effective_noise_multiplier`` assumes --
        also when the cohort size varies. The noise is drawn from ``stream`` (a secret stream).
        """
        check_int("cohort", cohort, 1)
        check_int("reports", reports, 0)
        if not (math.isfinite(bits_sum) and 0 <= bits_sum <= reports):
            raise ValueError(f"bits_sum {bits_sum!r} is not a sum of {reports} bits")
        draw = stream.gaussian((1,), self.count_noise_multiplier, torch.float64)
        fraction = (bits_sum - reports / 2 + float(draw)) / cohort + 0.5
        self.clip_norm *= math.exp(-self.learning_rate * (fraction - self.target_quantile))
        log.debug("adaptive clipping: noisy fraction %.4f, new C %.6g", fraction, self.clip_norm)
        return self.clip_norm

    def effective_noise_multiplier(self, z_total: float) -> float:
        """Noise multiplier left for the updates when one budget pays for updates and count.

        z_update = (z_total^-2 - (2 sigma_b)^-2)^(-1/2) (Andrew et al. 2021, Thm. 1): the updates
        (sensitivity C, noise z_update*C) and the centred count (sensitivity 1/2, noise sigma_b)
        together are one Gaussian mechanism with noise multiplier z_total. Add z_update*C to the
        updates and account every round with ``z_total``, never with z_update. Raises
        ``ValueError`` unless 2 sigma_b > z_total.
        """
        check_positive("z_total", z_total)
        two_sigma_b = 2.0 * self.count_noise_multiplier
        if two_sigma_b <= z_total:
            raise ValueError(
                f"count_noise_multiplier {self.count_noise_multiplier} is too small for a total "
                f"noise multiplier of {z_total}: it must exceed z_total / 2 = {z_total / 2} "
                "(Andrew et al. suggest expected cohort / 20)"
            )
        return (z_total**-2 - two_sigma_b**-2) ** -0.5
