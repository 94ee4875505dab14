"""Device side of user-level DP: turn a local model update into what may leave the device.

Guarantee (with the server's part, see ``server/user_dp.py``): every device's contribution to a
round's sum is an update of L2 norm at most C (flat or per-layer clipping), and the sum carries
Gaussian noise of std z*C -- added here in full (``local``: then each single update is itself
(epsilon, delta)-DP towards the server) or by the server (``central``: trusted server). Under
adaptive clipping the device also reports one bit (was my norm <= C?), which is part of the
mechanism and is noised with the same placement.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from fl.config import UserPrivacyConfig
from fl.privacy.user import clip_update, gaussian_noise_like, noise_std_per_device, per_layer_clip


def model_delta(trained: Mapping[str, Tensor], base: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``trained - base`` for every floating-point entry (the update a device sends)."""
    return {k: (trained[k] - base[k]).detach().clone() for k in base if base[k].is_floating_point()}


def privatize_update(
    delta: Mapping[str, Tensor], cfg: UserPrivacyConfig, clip_norm: float, cohort: int,
    generator: torch.Generator | None, secure: bool = False,
) -> tuple[dict[str, Tensor], float | None]:
    """Clip ``delta`` to ``clip_norm`` and add this device's share of the noise.

    Returns the update to send and, under adaptive clipping, the (noised, unless central) clip bit.
    """
    if cfg.clipping == "per_layer":
        clipped, _ = per_layer_clip(delta, clip_norm)
        norm_ok = None
    elif cfg.clipping in ("fixed", "adaptive"):
        clipped, norm = clip_update(delta, clip_norm)
        norm_ok = 1.0 if norm <= clip_norm else 0.0
    else:
        raise ValueError(f"unknown privacy.user.clipping={cfg.clipping!r}: fixed, adaptive or per_layer")
    std = noise_std_per_device(cfg.noise, cfg.noise_multiplier, clip_norm, cohort)
    if std > 0:
        noise = gaussian_noise_like(clipped, std, generator, secure)
        clipped = {k: v + noise[k] for k, v in clipped.items()}
    if cfg.clipping != "adaptive":
        return clipped, None
    bit = float(norm_ok)  # type: ignore[arg-type]
    bit_std = noise_std_per_device(cfg.noise, cfg.count_noise_multiplier, 1.0, cohort)
    if bit_std > 0:
        bit += float(torch.randn((), generator=generator)) * bit_std
    return clipped, bit
