"""Sample-level (utterance-level) differential privacy: DP-SGD on a device, with Opacus.

Guarantee: for one device, the sequence of models it releases over all rounds it has trained in
is (epsilon, delta)-DP with respect to adding or removing any single utterance of that device's
training data. This holds because every local step
  * samples a batch by Poisson sampling (each utterance independently with rate q = B / n),
  * clips every per-example gradient to L2 norm ``max_grad_norm`` (Opacus per-sample gradients),
  * adds Gaussian noise of std ``noise_multiplier * max_grad_norm`` to the sum -- also when the
    sampled batch is empty, so every step is a real mechanism invocation and is counted,
and the device's accountant history (noise, rate, steps) is carried across rounds by the caller
(``SampleAccount``), so epsilon composes over every step the device ever took.
It says nothing about a device's identity or its data as a whole: that is user-level DP.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import Sequence

import torch
from opacus import GradSampleModule
from opacus.accountants import create_accountant
from opacus.optimizers import DPOptimizer
from torch import nn

from fl.config import SamplePrivacyConfig, TrainConfig
from fl.data.features import Batch, Example, collate
from fl.privacy import grad_samplers  # noqa: F401  (registers the depthwise convolution's rule)
from fl.train import ctc_losses

History = list[tuple[float, float, int]]


@dataclass
class SampleAccount:
    """A device's cumulative DP-SGD history: ``(noise_multiplier, sample_rate, steps)`` runs."""

    history: History = field(default_factory=list)
    accountant: str = "rdp"

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.history)

    def epsilon(self, delta: float) -> float:
        """Epsilon of everything recorded so far at ``delta`` (0.0 before any step)."""
        if not self.history:
            return 0.0
        acc = create_accountant(self.accountant)
        acc.history = [tuple(h) for h in self.history]
        return float(acc.get_epsilon(delta=delta))


def sample_rate(n: int, batch_size: int) -> float:
    """Poisson sampling rate giving an expected batch of ``batch_size`` out of ``n`` examples."""
    return min(1.0, batch_size / n)


def poisson_batch(n: int, rate: float, rng: random.Random) -> list[int]:
    """Indices of one Poisson-sampled batch: each of ``n`` items independently with ``rate``."""
    return [i for i in range(n) if rng.random() < rate]


@dataclass(frozen=True)
class DPRoundStats:
    steps: int
    empty_steps: int
    mean_loss: float
    sample_rate: float


def make_private(model: nn.Module, train: TrainConfig, privacy: SamplePrivacyConfig, expected_batch_size: int,
                 seed: int, noise_multiplier: float | None = None) -> tuple[GradSampleModule, DPOptimizer]:
    """Wrap ``model`` for per-sample gradients and AdamW in Opacus' DP optimizer (clip, then noise)."""
    gs_model = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    optimizer = DPOptimizer(
        torch.optim.AdamW(
            [p for p in gs_model.parameters() if p.requires_grad], lr=train.lr, weight_decay=train.weight_decay
        ),
        noise_multiplier=privacy.noise_multiplier if noise_multiplier is None else noise_multiplier,
        max_grad_norm=privacy.max_grad_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction="mean",
        generator=None if privacy.secure_mode else torch.Generator().manual_seed(seed),
        secure_mode=privacy.secure_mode,
    )
    return gs_model, optimizer


def per_sample_backward(gs_model: GradSampleModule, batch: Batch, blank: int) -> torch.Tensor:
    """Fill every trainable parameter's ``grad_sample`` for ``batch``; returns the mean loss.

    Only the per-sample gradients are used, so autograd is asked for the features' gradient
    alone: it then skips the parameters' summed gradients (wasted work; ``.grad`` stays empty),
    while Opacus' hooks still receive every layer's output gradient.
    """
    feats = batch.feats.detach().requires_grad_()
    loss = ctc_losses(gs_model, replace(batch, feats=feats), blank).mean()
    loss.backward(inputs=[feats])
    return loss


def private_step(gs_model: GradSampleModule, optimizer: DPOptimizer, batch: Batch, blank: int) -> float:
    """One DP-SGD step on ``batch``: per-sample gradients, clipped, summed and noised; returns the loss."""
    optimizer.zero_grad(set_to_none=True)
    loss = per_sample_backward(gs_model, batch, blank)
    optimizer.step()
    return loss.item()


def dp_sgd_round(
    model: nn.Module,
    examples: Sequence[Example],
    train: TrainConfig,
    privacy: SamplePrivacyConfig,
    account: SampleAccount,
    blank: int,
    n_mels: int,
    seed: int,
    noise_multiplier: float | None = None,
) -> DPRoundStats:
    """Train ``model`` in place for ``train.local_steps`` DP-SGD steps; record them in ``account``.

    The sampling rate is ``train.batch_size / len(examples)`` (capped at 1); ``noise_multiplier``
    overrides ``privacy.noise_multiplier`` (the device's target-epsilon mode derives its own). In ``secure_mode`` the
    batch sampling and the noise use the OS's cryptographically secure generator.
    """
    n = len(examples)
    if n == 0:
        raise ValueError("DP-SGD needs at least one training example")
    rate = sample_rate(n, train.batch_size)
    rng: random.Random = random.SystemRandom() if privacy.secure_mode else random.Random(seed)
    gs_model, optimizer = make_private(model, train, privacy, max(1, round(rate * n)), seed, noise_multiplier)
    acc = create_accountant(account.accountant)
    acc.history = [tuple(h) for h in account.history]
    optimizer.attach_step_hook(acc.get_optimizer_hook_fn(sample_rate=rate))
    gs_model.train()
    losses: list[float] = []
    empty = 0
    params = [p for p in gs_model.parameters() if p.requires_grad]
    for _ in range(train.local_steps):
        idx = poisson_batch(n, rate, rng)
        if idx:
            losses.append(private_step(gs_model, optimizer, collate([examples[i] for i in idx], n_mels), blank))
        else:
            # An empty Poisson batch is still a step of the mechanism: noise only, counted.
            empty += 1
            optimizer.zero_grad(set_to_none=True)
            for p in params:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
            optimizer.step()
    account.history = [tuple(h) for h in acc.history]
    gs_model.to_standard_module()
    return DPRoundStats(
        steps=train.local_steps,
        empty_steps=empty,
        mean_loss=sum(losses) / len(losses) if losses else float("nan"),
        sample_rate=rate,
    )
