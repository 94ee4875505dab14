"""Sample-level (utterance-level) differential privacy: DP-SGD on a device, with Opacus.

Guarantee: for one device, the sequence of updates it releases over all rounds it has trained in
is (epsilon, delta)-DP with respect to adding or removing any single utterance of that device's
training data, against anyone who does not hold the device's secret (the server included).
This holds because every local step
  * samples a batch by Poisson sampling, each utterance independently with the *public* rate q
    (``privacy.sample.sample_rate``, the same for every device, so q says nothing about a
    device's n; the sampling coins come from the device's secret, stream ``batches``),
  * clips every per-example gradient to L2 norm C (Opacus per-sample gradients),
  * adds Gaussian noise of std z*C to the sum (stream ``dp-sgd-noise`` of the device's secret) --
    also when the sampled batch is empty, so every step is a mechanism invocation and is counted,
  * divides by the public expected batch size B (``train.batch_size``), never by a count of the
    device's data,
and the device's ledger (``SampleAccount``) carries its history across rounds and runs, so epsilon
composes over every step the device ever took. It says nothing about a device's identity or its
data as a whole: that is user-level DP (``fl/privacy/user.py``).

One owner: :class:`SampleLevel` holds the mechanism's parameters (z, C, q, steps per round), is
built from config in one place (the server's ``from_config``, which calibrates z for the
worst-case participation when a target epsilon is set), travels to devices in every train message
(``to_config``/``from_config``), is echoed back and checked (``echo``/``check_echo``), trains
(``train``) and accounts (``epsilon``) -- device and server read the same numbers.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from opacus import GradSampleModule
from opacus.accountants import create_accountant
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from torch import nn

from fl import protocol
from fl.config import SamplePrivacyConfig, TrainConfig
from fl.data.features import Batch, Example
from fl.model import Recognizer
from fl.privacy import grad_samplers  # noqa: F401  (registers the depthwise convolution's rule)
from fl.privacy.accounting import sample_level_noise_multiplier
from fl.privacy.randomness import BATCHES, DP_SGD_NOISE, Secret, Stream

History = list[tuple[float, float, int]]
ACCOUNTANTS = ("rdp", "prv")
"""Sample-level accountants whose epsilon is an upper bound (Opacus' ``gdp`` is an approximation: refused)."""

# train-message config keys (server -> device) and echo metric keys (device -> server)
Z, C, Q, STEPS = "sample-z", "sample-c", "sample-q", "sample-steps"


@dataclass
class SampleAccount:
    """A device's cumulative DP-SGD history: ``(noise_multiplier, sample_rate, steps)`` runs."""

    history: History = field(default_factory=list)
    accountant: str = "rdp"

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.history)

    def epsilon(self, delta: float) -> float:
        """Epsilon of everything recorded so far at ``delta`` (0.0 before any step).

        Runs of the same (z, q) are composed once with their steps added (:meth:`composed`): the
        same epsilon (composition is commutative, and RDP is additive in steps), in the time of one
        entry rather than one per round.
        """
        if not self.history:
            return 0.0
        acc = create_accountant(self.accountant)
        acc.history = self.composed()
        return float(acc.get_epsilon(delta=delta))

    def composed(self) -> History:
        """The history with the steps of equal (z, q) entries added up, in first-seen order."""
        steps: dict[tuple[float, float], int] = {}
        for z, q, n in self.history:
            steps[(z, q)] = steps.get((z, q), 0) + n
        return [(z, q, n) for (z, q), n in steps.items()]

    def plus(self, z: float, q: float, steps: int) -> "SampleAccount":
        """This history with one more run of ``steps`` steps appended (a copy)."""
        return SampleAccount(history=[*self.history, (z, q, steps)], accountant=self.accountant)


def poisson_batch(n: int, rate: float, stream: Stream) -> list[int]:
    """Indices of one Poisson-sampled batch: each of ``n`` items independently with ``rate``
    (coins from ``stream``, the device's secret ``batches`` stream)."""
    return stream.coins(n, rate)


class StreamNoiseDPOptimizer(DPOptimizer):
    """Opacus' ``DPOptimizer`` whose Gaussian noise comes from a secret ChaCha20 :class:`Stream`.

    Only the noise step is replaced: ``add_noise``, the method Opacus itself overrides to move the
    noise elsewhere (``DistributedDPOptimizer``). Per-sample clipping, accumulation, the division
    by the expected batch size and the wrapped optimizer's step are Opacus' own. Guarantee: each
    parameter's summed clipped gradient receives i.i.d. N(0, (z C)^2) noise drawn from ``stream``
    (``secure_mode``: Opacus' four-draw mitigation), so the step is DP-SGD's Gaussian mechanism
    and nobody without the stream's key can regenerate the noise (torch's generators are never
    used). ``tests/test_privacy_sample.py`` checks that a step equals Opacus' own step given the
    same noise.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, stream: Stream, **kwargs: Any) -> None:
        super().__init__(optimizer, **kwargs)
        self.stream = stream

    def add_noise(self) -> None:
        std = self.noise_multiplier * self.max_grad_norm
        for p in self.params:
            _check_processed_flag(p.summed_grad)
        noises = self.stream.gaussian_like([p.summed_grad for p in self.params], std, self.secure_mode)
        for p, noise in zip(self.params, noises):  # one draw for all parameters, then Opacus' own update
            p.grad = (p.summed_grad + noise).view_as(p)
            _mark_as_processed(p.summed_grad)


@dataclass(frozen=True)
class SampleLevel:
    """Utterance-level DP-SGD, both halves: the parameters, the device's training, the accounting.

    ``noise_multiplier`` z, ``max_grad_norm`` C, ``sample_rate`` q (public, one for all devices),
    ``steps`` per round; ``delta`` and ``accountant`` for epsilon; ``secure_mode``: Opacus'
    floating-point-attack-resistant noise sampling (a device-local choice, not part of the
    mechanism's parameters).
    """

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    delta: float = 1e-5
    accountant: str = "rdp"
    secure_mode: bool = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ValueError(f"sample-level noise multiplier must be > 0, got {self.noise_multiplier!r}")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"privacy.sample.max_grad_norm must be > 0, got {self.max_grad_norm!r}")
        if not 0.0 < self.sample_rate <= 1.0:
            raise ValueError(f"privacy.sample.sample_rate must be in (0, 1], got {self.sample_rate!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"DP-SGD steps per round must be an integer >= 1, got {self.steps!r}")
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"privacy.sample.delta must be in (0, 1), got {self.delta!r}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"privacy.sample.accountant={self.accountant!r} is not one of {ACCOUNTANTS} "
                             "(gdp is an approximation, not an upper bound)")

    @classmethod
    def from_config(cls, cfg: SamplePrivacyConfig, train: TrainConfig, rounds: int) -> "SampleLevel":
        """The run's mechanism (server side). With ``target_epsilon``, z is calibrated so that a
        device taking part in *every one* of ``rounds`` rounds stays within it: a bound, whatever
        the sampling of devices does."""
        z = cfg.noise_multiplier
        if cfg.target_epsilon is not None:
            z = sample_level_noise_multiplier(cfg.target_epsilon, cfg.delta, cfg.sample_rate,
                                              max(1, rounds) * train.local_steps, cfg.accountant)
        return cls(z, cfg.max_grad_norm, cfg.sample_rate, train.local_steps, cfg.delta, cfg.accountant,
                   cfg.secure_mode)

    # -- the wire: what the server tells devices, and what they echo ---------------------------------
    def to_config(self) -> dict[str, float | int]:
        return {Z: self.noise_multiplier, C: self.max_grad_norm, Q: self.sample_rate, STEPS: self.steps}

    @classmethod
    def from_message(cls, config: Mapping[str, Any], policy: SamplePrivacyConfig) -> "SampleLevel":
        """A device's mechanism: exactly the server's parameters; delta, accountant and secure mode
        are the device's own (its ledger and its noise sampling)."""
        missing = [k for k in (Z, C, Q, STEPS) if k not in config]
        if missing:
            raise ValueError(f"the train message lacks the sample-level parameters {missing}")
        return cls(float(config[Z]), float(config[C]), float(config[Q]), int(config[STEPS]), policy.delta,
                   policy.accountant, policy.secure_mode)

    def echo(self) -> dict[str, float | int]:
        """What a device reports it used (public parameters only)."""
        return self.to_config()

    def check_echo(self, metrics: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` unless ``metrics`` echo exactly this mechanism's parameters."""
        protocol.check_echo(self.to_config(), metrics)

    # -- accounting ------------------------------------------------------------------------------------
    def account_for(self, rounds: int, before: SampleAccount | None = None) -> SampleAccount:
        """The history of ``rounds`` rounds of this mechanism (after ``before``)."""
        account = SampleAccount(accountant=self.accountant) if before is None else before
        for _ in range(rounds):
            account = account.plus(self.noise_multiplier, self.sample_rate, self.steps)
        return account

    def epsilon(self, rounds: int) -> float:
        """Epsilon at ``delta`` of a device that trained ``rounds`` rounds of this mechanism."""
        return self.account_for(rounds).epsilon(self.delta)

    # -- the device's half -----------------------------------------------------------------------------
    def make_private(self, model: nn.Module, train: TrainConfig, stream: Stream
                     ) -> tuple[GradSampleModule, StreamNoiseDPOptimizer]:
        """Wrap ``model`` for per-sample gradients and AdamW in Opacus' DP optimizer (clip, then noise).

        The optimizer averages by the public ``train.batch_size``; ``stream`` (secret) draws the noise.
        """
        gs_model = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        optimizer = StreamNoiseDPOptimizer(
            torch.optim.AdamW([p for p in gs_model.parameters() if p.requires_grad], lr=train.lr,
                              weight_decay=train.weight_decay),
            noise_multiplier=self.noise_multiplier, max_grad_norm=self.max_grad_norm,
            expected_batch_size=train.batch_size, loss_reduction="mean", stream=stream,
            secure_mode=self.secure_mode,
        )
        return gs_model, optimizer

    def train(self, model: nn.Module, recognizer: Recognizer, examples: Sequence[Example], train: TrainConfig,
              account: SampleAccount, secret: Secret, release: int) -> float:
        """Train ``model`` in place for ``steps`` DP-SGD steps and record them in ``account``.

        Batches and noise come from ``secret``'s streams for this ``release`` (the device's release
        counter: a new release never reuses a stream). ``examples`` may be empty: every batch is
        then empty and the update is noise alone -- still the same mechanism, nothing about n
        leaks. Returns the mean loss of the non-empty steps (NaN if none; never sent under DP).
        """
        batches = secret.stream(BATCHES, release)
        gs_model, optimizer = self.make_private(model, train, secret.stream(DP_SGD_NOISE, release))
        gs_model.train()
        losses: list[float] = []
        params = [p for p in gs_model.parameters() if p.requires_grad]
        for _ in range(self.steps):
            idx = poisson_batch(len(examples), self.sample_rate, batches)
            optimizer.zero_grad(set_to_none=True)
            if idx:
                batch = recognizer.collate([examples[i] for i in idx])
                losses.append(per_sample_backward(gs_model, recognizer, batch).item())
            else:  # an empty Poisson batch is still a step of the mechanism: noise only, counted
                for p in params:
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
            optimizer.step()
        account.history = self.account_for(1, account).history
        gs_model.to_standard_module()
        return sum(losses) / len(losses) if losses else float("nan")


def per_sample_backward(gs_model: GradSampleModule, recognizer: Recognizer, batch: Batch) -> torch.Tensor:
    """Fill every trainable parameter's ``grad_sample`` for ``batch``; returns the mean loss.

    Only the per-sample gradients are used, so autograd is asked for the gradients of the inputs the
    recognizer names (:meth:`Recognizer.private_losses`) alone: it then skips the parameters' summed
    gradients (wasted work; ``.grad`` stays empty), while Opacus' hooks still receive every layer's
    output gradient.
    """
    losses, leaves = recognizer.private_losses(gs_model, batch)
    loss = losses.mean()
    with warnings.catch_warnings():
        # A first layer whose input needs no gradient (frozen below it) makes torch say its full
        # backward hook fires on output gradients alone: exactly what Opacus' hooks use
        # (tests/test_whisper.py checks the per-sample gradients this way).
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
        loss.backward(inputs=leaves)
    return loss


def private_step(gs_model: GradSampleModule, optimizer: DPOptimizer, recognizer: Recognizer, batch: Batch) -> float:
    """One DP-SGD step on ``batch``: per-sample gradients, clipped, summed and noised; returns the loss."""
    optimizer.zero_grad(set_to_none=True)
    loss = per_sample_backward(gs_model, recognizer, batch)
    optimizer.step()
    return loss.item()
