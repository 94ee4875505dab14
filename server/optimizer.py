"""The server optimizer: how the round's mean update becomes the next global model (Reddi et al. 2021).

``mean_update`` (Delta) is the round's mean model update, noised under DP: the descent direction
(under DP-FedSGD the caller passes minus the noised mean gradient). ``fedavg``: x + lr * Delta (lr 1
is plain FedAvg). ``fedavgm``: m = beta1 m + Delta; x + lr m. ``fedadam``: m = beta1 m + (1 - beta1)
Delta, v = beta2 v + (1 - beta2) Delta^2, x + lr m^ / (sqrt(v^) + tau) with the bias-corrected
m^ = m / (1 - beta1^t), v^ = v / (1 - beta2^t). ``fedyogi``: as ``fedadam`` but
v = v - (1 - beta2) Delta^2 sign(v - Delta^2); here v and m start at 0 as in Adam (Reddi et al.
take v_{-1} >= tau^2; from 0 Yogi's first step equals Adam's) and are bias-corrected the same way.
Everything is computed in float64 and rounded to each tensor's dtype at the end.

Privacy: a step is post-processing of the released (noised) mean, so it costs no privacy; its
state (m, v, t) is derived only from released aggregates, so it holds nothing private beyond what
the released models already show. It lives in the server's committed state
(``server/checkpoint.py``), and loading it makes a resumed run's steps bit-identical to an
uninterrupted run's.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from fl.config import SERVER_OPTIMIZERS, FederationConfig, SamplePrivacyConfig, UserPrivacyConfig

log = logging.getLogger(__name__)


DEFAULT_LR = {"fedavg": 1.0, "fedavgm": 1.0, "fedadam": 1e-3, "fedyogi": 1e-3}
"""A named optimizer's learning rate when ``federation.server_lr`` is null (and it is not the mechanism's default)."""
FEDSGD_DEFAULT = ("fedadam", 3e-3)
"""DP-FedSGD: Adam on the noised mean gradient, at the rate of the pooled DP-SGD fine-tune it equals."""
USER_LEVEL_DEFAULT = ("fedadam", 5e-4)
"""User-level DP: Adam moves each value by about lr a round whatever the noise on the mean, so the
model stays near the seed when the noise drowns the signal (plain FedAvg at lr 1 adds the noise itself)."""


def default_optimizer(sample: Optional[SamplePrivacyConfig], user: Optional[UserPrivacyConfig]) -> tuple[str, float]:
    """The server optimizer and learning rate a mechanism gets unless the config names them."""
    if user is not None:
        return USER_LEVEL_DEFAULT
    if sample is not None and sample.noise != "device":
        return FEDSGD_DEFAULT
    return "fedavg", 1.0


@dataclass
class ServerOptimizer:
    """One of ``SERVER_OPTIMIZERS`` with its hyperparameters and its state: the step count ``t`` and
    the float64 moments ``m`` (``fedavgm``, ``fedadam``, ``fedyogi``) and ``v`` (the adaptive two),
    keyed by parameter name."""

    name: str
    lr: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    t: int = field(default=0, init=False)
    m: dict[str, Tensor] = field(default_factory=dict, init=False)
    v: dict[str, Tensor] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        if self.name not in SERVER_OPTIMIZERS:
            raise ValueError(f"server optimizer {self.name!r} is not one of {SERVER_OPTIMIZERS}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"server_lr must be a finite number > 0, got {self.lr!r}")
        for key in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ValueError(f"server_{key} must be in [0, 1), got {getattr(self, key)!r}")
        if not (math.isfinite(self.tau) and self.tau > 0):
            raise ValueError(f"server_tau must be a finite number > 0, got {self.tau!r}")

    @classmethod
    def from_config(cls, fed: FederationConfig, sample: Optional[SamplePrivacyConfig] = None,
                    user: Optional[UserPrivacyConfig] = None) -> "ServerOptimizer":
        """The run's optimizer: ``federation.server_optimizer`` and ``server_lr``, or where null the
        mechanism's default (:func:`default_optimizer`; a named optimizer without a learning rate
        takes :data:`DEFAULT_LR`'s)."""
        name, lr = default_optimizer(sample, user)
        if fed.server_optimizer is not None and fed.server_optimizer != name:
            name, lr = fed.server_optimizer, DEFAULT_LR.get(fed.server_optimizer, 1.0)
        opt = cls(name, fed.server_lr if fed.server_lr is not None else lr, fed.server_beta1, fed.server_beta2,
                  fed.server_tau)
        log.info("server optimizer %s (lr %g, beta1 %g, beta2 %g, tau %g)", opt.name, opt.lr, opt.beta1,
                 opt.beta2, opt.tau)
        return opt

    def step(self, arrays: Mapping[str, Tensor], mean_update: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The new arrays (a new dict): ``arrays`` moved by ``mean_update``. Entries the update does not
        name and non-floating tensors pass through unchanged. Raises ``ValueError`` (with the state
        untouched) for an update naming an array the model lacks, of another shape, or not finite,
        or for a step that would write a non-finite value."""
        for k, d in mean_update.items():
            if k not in arrays:
                raise ValueError(f"server optimizer: the mean update has {k!r}, which the model lacks")
            if d.shape != arrays[k].shape:
                raise ValueError(f"server optimizer: {k!r} has shape {tuple(d.shape)} in the mean update, "
                                 f"{tuple(arrays[k].shape)} in the model")
            if not bool(torch.isfinite(d).all()):
                raise ValueError(f"server optimizer: the mean update's {k!r} is not finite")
        t = self.t + 1
        m, v = dict(self.m), dict(self.v)
        out = dict(arrays)
        for k, d in mean_update.items():
            x = arrays[k]
            if not x.is_floating_point():
                continue
            x64, d64 = x.double(), d.to(device=x.device, dtype=torch.float64)
            if self.name == "fedavg":
                new = x64 + self.lr * d64
            elif self.name == "fedavgm":
                m[k] = self.beta1 * m.get(k, torch.zeros_like(x64)) + d64
                new = x64 + self.lr * m[k]
            else:
                m[k] = self.beta1 * m.get(k, torch.zeros_like(x64)) + (1 - self.beta1) * d64
                prev, sq = v.get(k, torch.zeros_like(x64)), d64 * d64
                if self.name == "fedadam":
                    v[k] = self.beta2 * prev + (1 - self.beta2) * sq
                else:
                    v[k] = prev - (1 - self.beta2) * sq * torch.sign(prev - sq)
                m_hat, v_hat = m[k] / (1 - self.beta1 ** t), v[k] / (1 - self.beta2 ** t)
                new = x64 + self.lr * m_hat / (v_hat.sqrt() + self.tau)
            out[k] = new.to(x.dtype)
            if not bool(torch.isfinite(out[k]).all()):
                raise ValueError(f"server optimizer: the step would make {k!r} non-finite in {x.dtype}")
        self.t, self.m, self.v = t, m, v
        return out

    def state_dict(self) -> dict[str, Any]:
        """Plain and ``torch.save``-able: the name, the step count and the float64 moments."""
        return {"name": self.name, "t": self.t, "m": dict(self.m), "v": dict(self.v)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state`` (a ``state_dict()``, as the server's checkpoint holds it)."""
        if state.get("name") != self.name:
            raise ValueError(f"server optimizer state is {state.get('name')!r}'s, this run's is {self.name!r}")
        t = state.get("t")
        if not isinstance(t, int) or t < 0:
            raise ValueError(f"server optimizer state: step count {t!r} is not an int >= 0")
        moments = {}
        for key in ("m", "v"):
            value = state.get(key)
            if not isinstance(value, Mapping) or not all(isinstance(x, Tensor) for x in value.values()):
                raise ValueError(f"server optimizer state: {key!r} is not a mapping of tensors")
            moments[key] = {k: x.to(torch.float64) for k, x in value.items()}
        self.t, self.m, self.v = t, moments["m"], moments["v"]
        log.info("server optimizer %s resumed after %d steps", self.name, t)
