"""What both sides of a SecAgg+ round must agree on: one config key and the range arithmetic.

Flower's SecAgg+ does not sum floats. Each device clips every coordinate of its vector to
[-R, R] (R = ``clipping_range``), maps it onto the integers 0..Q (Q = ``quantization_range``) with
unbiased stochastic rounding, and the masked integers are summed modulo M (``modulus_range``).
Hence, for a sum over m devices:
  * no wrap-around needs m * Q < M (``quantization_range_for`` picks the largest such Q);
  * the quantisation step is delta = 2R / Q; each device's rounding error per coordinate is in
    (-delta, delta), zero-mean, variance <= delta^2 / 4, so the sum's error is at most m * delta
    per coordinate (typically sqrt(m) * delta / 2);
  * a coordinate outside [-R, R] is silently clipped *on the device, before summation*.
    ``clipping_range_for`` picks R so that this practically never happens for a clipped and
    noised update (every coordinate of an update of L2 norm <= C is within [-C, C]; the Gaussian
    share adds at most k sigma with probability >= 1 - failure).
These two steps (range clipping, quantisation) happen before summation, so the released sum is
sum_i Q(clip_R(y_i)), not sum_i y_i. The DP guarantee is proven for the latter; we treat the
difference as negligible (range clipping: probability <= ``failure`` per round, which can be added
to delta; quantisation: a zero-mean perturbation of at most m * delta, ~1e-7 relative for typical
settings, far below the noise std). A formal treatment would use discrete noise (the distributed
discrete Gaussian, Kairouz et al. 2021, or Skellam, Agarwal et al. 2021).
"""

from __future__ import annotations

import math

#: config key (server -> device) naming the global model's arrays in the order SecAgg+ sends them
SECURE_NAMES = "secure-names"
#: Flower's default and largest safe modulus (masks are drawn in int64 below 2**32)
MODULUS_RANGE = 2**32


def quantization_range_for(devices: int, modulus_range: int = MODULUS_RANGE) -> int:
    """Largest Q such that the sum of ``devices`` values in 0..Q, and of their unit weights, stays below M."""
    if devices < 1:
        raise ValueError(f"devices must be >= 1, got {devices}")
    q = (modulus_range - 1) // devices
    if q < 2:
        raise ValueError(f"modulus_range {modulus_range} is too small for {devices} devices")
    return min(q, 2**31 - 1)  # Flower quantises into int32


def quantization_step(clipping_range: float, quantization_range: int) -> float:
    """delta = 2R / Q: one device's rounding error per coordinate is below this."""
    return 2.0 * clipping_range / quantization_range


def clipping_range_for(clip_norm: float, noise_std: float, numel: int, devices: int,
                       failure: float = 1e-12) -> float:
    """R = C + k * sigma with the smallest k (step 0.01) such that the probability that any of
    ``devices`` updates of ``numel`` coordinates has a coordinate outside [-R, R] is <= ``failure``.

    Valid for updates clipped to L2 norm ``clip_norm`` plus i.i.d. N(0, noise_std^2) per coordinate
    (union bound: devices * numel * P(|N(0, 1)| > k)).
    """
    if not (clip_norm > 0 and noise_std >= 0 and numel >= 1 and devices >= 1 and 0 < failure < 1):
        raise ValueError("need clip_norm > 0, noise_std >= 0, numel >= 1, devices >= 1, 0 < failure < 1")
    if noise_std == 0:
        return float(clip_norm)
    k = 0.0
    while devices * numel * math.erfc(k / math.sqrt(2.0)) > failure:
        k += 0.01
    return float(clip_norm + k * noise_std)
