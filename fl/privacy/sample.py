"""Sample-level (utterance-level) differential privacy: DP-SGD on a device, or once on the aggregate.

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

Where the noise goes (``noise``): ``device`` is the above. ``central`` and ``distributed`` are
DP-FedSGD: each round is ``steps`` DP-SGD steps of the whole federation at the global weights. Every
device draws its Poisson batches at q from its secret, clips each utterance's gradient to C (Opacus'
``clip_and_accumulate``), sums each batch and projects it onto the ball of radius ``sum_cap / steps``
(1-Lipschitz, so one utterance still moves it by at most C), adds the batches and sends the total
(``clipped_sum``); its norm is within ``sum_cap``, so the server's own projection of a clear sum
(``check_contribution``) leaves an honest one unchanged; the noise
N(0, steps (z C)^2) goes once on the cohort's total -- added by the server from its secret
(``central``: the server is trusted, it sees clipped sums), or as shares N(0, steps (zC)^2 / t)
each device draws from its own secret inside SecAgg+, which decodes only sums of >= t devices
(``distributed``) -- and the total is divided by the public expected batch B (``aggregate``). The
same guarantee as above then holds for the released models (and, under ``distributed``, against an
honest-but-curious server), accounted the same way: ``steps`` Poisson-subsampled Gaussian steps at
(z, q) a round, for every round the device was asked (no credit for sampling devices). This is the
split of Opacus' ``DistributedDPOptimizer``: workers clip and sum, the noise is added once.

One owner: :class:`SampleLevel` holds the mechanism's parameters (z, C, q, steps per round), is
built from config in one place (the server's ``from_config``, which calibrates z for the
worst-case participation when a target epsilon is set), travels to devices in every train message
(``to_config``/``from_config``), is echoed back and checked (``echo``/``check_echo``), trains
(``train``) and accounts (``epsilon``) -- device and server read the same numbers.
"""

from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from torch import Tensor, nn

from fl import protocol
from fl.config import SAMPLE_NOISE_PLACEMENTS, SamplePrivacyConfig, TrainConfig
from fl.data.features import Batch, Example
from fl.model import Recognizer
from fl.privacy import grad_samplers  # noqa: F401  (registers the depthwise convolution's rule)
from fl.privacy.accounting import SAMPLE_ACCOUNTANTS, sample_level_epsilon, sample_level_noise_multiplier
from fl.privacy.gaussian import clip_update, gaussian_noise_like, noise_norm_bound, update_norm
from fl.privacy.randomness import BATCHES, DP_SGD_NOISE, SERVER_NOISE, Secret, Stream

History = list[tuple[float, float, int]]
ACCOUNTANTS = SAMPLE_ACCOUNTANTS
"""Sample-level accountants whose epsilon is an upper bound (Opacus' ``gdp`` is an approximation: refused)."""

# train-message config keys (server -> device) and echo metric keys (device -> server)
Z, C, Q, STEPS = "sample-z", "sample-c", "sample-q", "sample-steps"
NOISE, BATCH, CAP, COHORT = "sample-noise", "sample-batch", "sample-sum-cap", "sample-noise-cohort"
SUM_CAP_BATCHES = 4.0
"""A device's clipped sum is bounded by C x steps x max(4, 3 x its expected batch) (``SampleLevel.sum_cap``)."""


@dataclass
class SampleAccount:
    """A device's cumulative DP-SGD history: ``(noise_multiplier, sample_rate, steps)`` runs."""

    history: History = field(default_factory=list)
    accountant: str = "pld"

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.history)

    def epsilon(self, delta: float) -> float:
        """Epsilon of everything recorded so far at ``delta`` (0.0 before any step).

        Runs of the same (z, q) are composed once with their steps added (:meth:`composed`): the
        same epsilon (composition is commutative, and RDP is additive in steps), in the time of one
        entry rather than one per round.
        """
        return sample_level_epsilon(self.composed(), delta, self.accountant)

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
    mechanism's parameters). ``noise``: where the noise is added (``device``: every device runs
    DP-SGD; ``central`` / ``distributed``: DP-FedSGD, the noise goes on the cohort's total once);
    for those, ``expected_batch`` B (the public constant the noised total is divided by),
    ``sum_cap`` (the L2 bound of one device's clipped sum) and, for ``distributed``,
    ``noise_cohort`` t (every device adds 1/t of the noise variance; SecAgg+ decodes only sums of
    >= t devices).
    """

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    delta: float = 1e-5
    accountant: str = "pld"
    secure_mode: bool = False
    noise: str = "device"
    expected_batch: float = 0.0
    sum_cap: float = 0.0
    noise_cohort: int = 0

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
        if self.noise not in SAMPLE_NOISE_PLACEMENTS:
            raise ValueError(f"privacy.sample.noise={self.noise!r} is not one of {SAMPLE_NOISE_PLACEMENTS}")
        if self.aggregated and not (self.expected_batch > 0 and self.sum_cap > 0
                                    and math.isfinite(self.expected_batch) and math.isfinite(self.sum_cap)):
            raise ValueError(f"noise={self.noise} needs an expected batch and a sum cap > 0, got "
                             f"{self.expected_batch!r} and {self.sum_cap!r}")
        if (self.noise == "distributed") != (self.noise_cohort >= 3) or self.noise_cohort < 0:
            raise ValueError(f"noise={self.noise} with noise cohort {self.noise_cohort!r}: distributed noise needs a "
                             "cohort >= 3 (privacy.sample.secure_threshold), the other placements none")

    @property
    def aggregated(self) -> bool:
        """DP-FedSGD: devices send clipped sums and the noise goes on the cohort's total (central, distributed)."""
        return self.noise != "device"

    @property
    def total_std(self) -> float:
        """Std of the noise on each coordinate of a round's total under DP-FedSGD: z C sqrt(steps)
        (``steps`` batches at the same weights, each a z-Gaussian release of its clipped sum)."""
        return self.noise_multiplier * self.max_grad_norm * math.sqrt(self.steps)

    @property
    def device_std(self) -> float:
        """Std of the share each device adds to its clipped sum (``distributed``; 0 otherwise)."""
        return self.total_std / math.sqrt(self.noise_cohort) if self.noise == "distributed" else 0.0

    @classmethod
    def from_config(cls, cfg: SamplePrivacyConfig, train: TrainConfig, rounds: int,
                    expected_cohort: int = 1) -> "SampleLevel":
        """The run's mechanism (server side). With ``target_epsilon``, z is calibrated so that a
        device taking part in *every one* of ``rounds`` rounds stays within it: a bound, whatever
        the sampling of devices does. ``expected_cohort``: the devices a round asks on average
        (public config), for DP-FedSGD's default expected batch, ``train.batch_size`` x it."""
        z = cfg.noise_multiplier
        if cfg.target_epsilon is not None:
            z = sample_level_noise_multiplier(cfg.target_epsilon, cfg.delta, cfg.sample_rate,
                                              max(1, rounds) * train.local_steps, cfg.accountant)
        if cfg.noise == "device":
            return cls(z, cfg.max_grad_norm, cfg.sample_rate, train.local_steps, cfg.delta, cfg.accountant,
                       cfg.secure_mode)
        batch = cfg.expected_batch if cfg.expected_batch is not None else train.batch_size * expected_cohort
        per_device = batch / max(1, expected_cohort)
        cap = cfg.max_grad_norm * train.local_steps * max(SUM_CAP_BATCHES, math.ceil(3.0 * per_device))
        cohort = cfg.secure_threshold if cfg.noise == "distributed" else 0
        return cls(z, cfg.max_grad_norm, cfg.sample_rate, train.local_steps, cfg.delta, cfg.accountant,
                   cfg.secure_mode, cfg.noise, float(batch), float(cap), cohort)

    # -- the wire: what the server tells devices, and what they echo ---------------------------------
    def to_config(self) -> dict[str, float | int]:
        out: dict[str, float | int] = {Z: self.noise_multiplier, C: self.max_grad_norm, Q: self.sample_rate,
                                       STEPS: self.steps, NOISE: SAMPLE_NOISE_PLACEMENTS.index(self.noise)}
        if self.aggregated:
            out |= {BATCH: self.expected_batch, CAP: self.sum_cap, COHORT: self.noise_cohort}
        return out

    @classmethod
    def from_message(cls, config: Mapping[str, Any], policy: SamplePrivacyConfig) -> "SampleLevel":
        """A device's mechanism: exactly the server's parameters; delta, accountant and secure mode
        are the device's own (its ledger and its noise sampling)."""
        missing = [k for k in (Z, C, Q, STEPS, NOISE) if k not in config]
        if missing:
            raise ValueError(f"the train message lacks the sample-level parameters {missing}")
        code = int(config[NOISE])  # type: ignore[arg-type]
        if not 0 <= code < len(SAMPLE_NOISE_PLACEMENTS):
            raise ValueError(f"unknown sample-level noise placement code {code}")
        noise = SAMPLE_NOISE_PLACEMENTS[code]
        extra: tuple[float, float, int] = (0.0, 0.0, 0)
        if noise != "device":
            absent = [k for k in (BATCH, CAP, COHORT) if k not in config]
            if absent:
                raise ValueError(f"the train message lacks the DP-FedSGD parameters {absent}")
            extra = (float(config[BATCH]), float(config[CAP]), int(config[COHORT]))  # type: ignore[arg-type]
        return cls(float(config[Z]), float(config[C]), float(config[Q]), int(config[STEPS]), policy.delta,
                   policy.accountant, policy.secure_mode, noise, *extra)

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

    def epsilon(self, rounds: int, accountant: str | None = None) -> float:
        """Epsilon at ``delta`` of a device that trained ``rounds`` rounds of this mechanism (with
        ``accountant``, default the mechanism's own: the RDP figure is reported beside it)."""
        account = self.account_for(rounds)
        return replace(account, accountant=accountant or self.accountant).epsilon(self.delta)

    # -- DP-FedSGD, the server's half ------------------------------------------------------------------
    def check_contribution(self, contribution: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """A device's clipped sum as the server may add it (central): projected onto the ball of
        radius ``sum_cap``. The projection is 1-Lipschitz, so one utterance still moves the total by
        at most C, and no device -- whatever it sends -- moves it by more than the cap."""
        return clip_update(contribution, self.sum_cap)[0]

    def check_total(self, total: Mapping[str, Tensor], contributors: int, step: float) -> None:
        """Raise ``ValueError`` unless a securely aggregated total of ``contributors`` clipped sums is
        finite and within the norm an honest one has (quantisation ``step`` per coordinate included)."""
        norm = update_norm(total)
        numel = sum(t.numel() for t in total.values())
        bound = (contributors * self.sum_cap + noise_norm_bound(self.device_std * math.sqrt(contributors), numel)
                 + contributors * step * math.sqrt(numel))
        if not norm <= bound:
            raise ValueError(f"the decoded total of {contributors} clipped sums has norm {norm:.4g}, above the "
                             f"{bound:.4g} of honest ones (a device sent out-of-range values)")

    def aggregate(self, contributions: Sequence[Mapping[str, Tensor]], reference: Mapping[str, Tensor],
                  secret: Secret, server_round: int) -> dict[str, Tensor]:
        """The round's noised mean descent direction, -(sum + N(0, steps z^2 C^2)) / (steps B).

        ``contributions``: checked clipped sums (central), or the one decoded total (distributed:
        it already carries the devices' shares). Central noise: stream ``server-noise`` of the
        server's ``secret`` for ``server_round``; a round with no contribution still adds it.
        """
        total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in reference.items() if v.is_floating_point()}
        for c in contributions:
            for k in total:
                total[k] += c[k].to(torch.float64)
        if self.noise == "central":
            noise = gaussian_noise_like(total, self.total_std, secret.stream(SERVER_NOISE, server_round),
                                        self.secure_mode)
            total = {k: v + noise[k] for k, v in total.items()}
        scale = -1.0 / (self.steps * self.expected_batch)
        return {k: (v * scale).to(reference[k].dtype) for k, v in total.items()}

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
              account: SampleAccount, secret: Secret, release: int,
              label: Optional[Callable[[Sequence[Example]], list[Example]]] = None) -> float:
        """Train ``model`` in place for ``steps`` DP-SGD steps and record them in ``account``.

        Batches and noise come from ``secret``'s streams for this ``release`` (the device's release
        counter: a new release never reuses a stream). ``examples`` may be empty: every batch is
        then empty and the update is noise alone -- still the same mechanism, nothing about n
        leaks. ``label`` (a :class:`fl.labels.Labeler`) labels each Poisson batch after it is drawn;
        a drawn recording it leaves out contributes zero, within the clipping bound, so the step's
        guarantee is the same. Returns the mean loss of the non-empty steps (NaN if none; never sent
        under DP).
        """
        batches = secret.stream(BATCHES, release)
        gs_model, optimizer = self.make_private(model, train, secret.stream(DP_SGD_NOISE, release))
        gs_model.train()
        losses: list[float] = []
        params = [p for p in gs_model.parameters() if p.requires_grad]
        for _ in range(self.steps):
            drawn = [examples[i] for i in poisson_batch(len(examples), self.sample_rate, batches)]
            drawn = label(drawn) if label is not None and drawn else drawn
            optimizer.zero_grad(set_to_none=True)
            if drawn:
                losses.append(per_sample_backward(gs_model, recognizer, recognizer.collate(drawn)).item())
            else:  # an empty Poisson batch is still a step of the mechanism: noise only, counted
                for p in params:
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
            optimizer.step()
        account.history = self.account_for(1, account).history
        gs_model.to_standard_module()
        return sum(losses) / len(losses) if losses else float("nan")


    def clipped_sum(self, weights: Mapping[str, Tensor], module: "ClippingModule", examples: Sequence[Example],
                    account: SampleAccount, secret: Secret, release: int,
                    label: Optional[Callable[[Sequence[Example]], list[Example]]] = None) -> dict[str, Tensor]:
        """DP-FedSGD, the device's half: ``steps`` Poisson batches at the global ``weights`` (the
        shared entries of the train message), every utterance's gradient clipped to C (Opacus' own
        ``clip_and_accumulate``), each batch's sum projected onto the ball of radius
        ``sum_cap / steps``, the batches' sums added, plus -- ``distributed`` -- this device's share
        N(0, device_std^2) (stream ``dp-sgd-noise``).
        Nothing is stepped; a device whose batches are all empty runs no model at all. ``module``:
        the process's wrapped seed module (:class:`ClippingModule`), loaded with ``weights`` here.
        ``account`` records the ``steps`` composed steps. Keys: every floating-point entry of
        ``weights`` (zeros where nothing trains), so the reply has the global model's layout.
        ``label`` (a :class:`fl.labels.Labeler`) labels each batch after its coins are drawn; a
        recording it leaves out contributes zero.

        Guarantee: one utterance moves the (pre-noise) sum by at most C in each batch it is drawn
        in, each batch a z-Gaussian step once the total's noise is added (server or shares).
        """
        if not self.aggregated:
            raise ValueError("clipped_sum is DP-FedSGD's device half: noise=central or distributed only")
        coins = secret.stream(BATCHES, release)
        drawn = [[examples[i] for i in poisson_batch(len(examples), self.sample_rate, coins)]
                 for _ in range(self.steps)]  # every step's coins first, whatever the labels
        batches = [b for b in ((label(d) if label is not None and d else d) for d in drawn) if b]
        contribution = {k: torch.zeros_like(v) for k, v in weights.items() if v.is_floating_point()}
        if batches:
            summed = module.clipped_sums(weights, batches, self.max_grad_norm, self.sum_cap / self.steps)
            contribution |= {k: v.to(contribution[k]) for k, v in summed.items()}  # the weights' dtype, on the CPU
        if self.device_std > 0:
            noise = gaussian_noise_like(contribution, self.device_std, secret.stream(DP_SGD_NOISE, release),
                                        self.secure_mode)
            contribution = {k: v + noise[k] for k, v in contribution.items()}
        account.history = self.account_for(1, account).history
        return contribution


class ClippingModule:
    """DP-FedSGD's per-utterance clipped sums on one Opacus-wrapped seed module, kept for the life of
    a process (a device, or one simulation actor serving many devices) and loaded with each
    request's shared weights.

    Building the seed and wrapping it in a ``GradSampleModule`` on every train message cost a
    device about as much as the gradients of the one or two utterances its Poisson batch draws
    (docs/scale.md, ``aggregate_round_seconds``). Nothing ever steps this module: its frozen weights
    stay the seed's, and :meth:`clipped_sums` loads the request's shared weights -- every shared
    entry, so nothing of an earlier request's weights remains -- and clears every per-sample buffer
    Opacus keeps (``grad_sample``, ``summed_grad``, captured activations) before it runs, so no
    request's gradients or activations reach another's. A call that fails drops the module (the
    next builds a fresh one). It unpickles as :meth:`of` its recognizer: a simulation ships the
    ClientApp with every message, and each actor process keeps using its one module.
    """

    def __init__(self, recognizer: Recognizer) -> None:
        self.recognizer = recognizer
        self._wrapped: Optional[GradSampleModule] = None

    @staticmethod
    def of(recognizer: Recognizer) -> "ClippingModule":
        """This process's one module for ``recognizer`` (made at the first call)."""
        return process_clipping_module(recognizer)

    def __reduce__(self) -> tuple:
        return (process_clipping_module, (self.recognizer,))

    def _at(self, weights: Mapping[str, Tensor]) -> GradSampleModule:
        """The wrapped module with ``weights`` loaded and no per-sample state left from any earlier call."""
        if self._wrapped is None:
            self._wrapped = GradSampleModule(self.recognizer.new_module(), batch_first=True, loss_reduction="mean")
        gs_model = self._wrapped
        self.recognizer.load_shared(gs_model._module, weights)
        for p in gs_model.parameters():  # Opacus' per-parameter state, as a fresh wrap leaves it (gsm_base)
            p.grad = None
            p._forward_counter = 0  # forwards not yet matched by a backward
            if hasattr(p, "_current_grad_sample"):
                del p._current_grad_sample
            for attr in ("grad_sample", "summed_grad"):
                if hasattr(p, attr):
                    setattr(p, attr, None)
        for m in gs_model.modules():
            for attr in ("activations", "max_batch_len"):
                if hasattr(m, attr):
                    delattr(m, attr)
        gs_model.train()
        return gs_model

    def clipped_sums(self, weights: Mapping[str, Tensor], batches: Sequence[Sequence[Example]],
                     max_grad_norm: float, batch_cap: float) -> dict[str, Tensor]:
        """Sum over ``batches`` of the per-utterance gradients of the trainable parameters at
        ``weights``, each clipped to ``max_grad_norm`` by Opacus' ``DPOptimizer.clip_and_accumulate``
        (never stepped; a batch of one with that method's factor, :meth:`_clipped_one`), every
        batch's sum projected onto the ball of radius ``batch_cap`` before it is added (a 1-Lipschitz map, so every batch is one step of sensitivity C)."""
        try:
            gs_model = self._at(weights)
            named = [(n, p) for n, p in gs_model._module.named_parameters() if p.requires_grad]
            clipper = DPOptimizer(torch.optim.SGD([p for _, p in named], lr=0.0), noise_multiplier=0.0,
                                  max_grad_norm=max_grad_norm, expected_batch_size=1, loss_reduction="mean")
            total: dict[str, Tensor] = {}
            for drawn in batches:
                if len(drawn) == 1:
                    batch = self._clipped_one(gs_model, named, drawn[0], max_grad_norm)
                else:
                    per_sample_backward(gs_model, self.recognizer, self.recognizer.collate(drawn))
                    clipper.clip_and_accumulate()  # this batch's clipped sum in every p.summed_grad
                    batch = {n: p.summed_grad.detach().clone() for n, p in named if p.summed_grad is not None}
                    clipper.zero_grad(set_to_none=True)  # grad_sample and summed_grad: the next batch starts clean
                for n, v in clip_update(batch, batch_cap)[0].items():
                    total[n] = total[n] + v if n in total else v
            return total
        except BaseException:
            self._wrapped = None
            raise

    def _clipped_one(self, gs_model: GradSampleModule, named: Sequence[tuple[str, nn.Parameter]], example: Example,
                     max_grad_norm: float) -> dict[str, Tensor]:
        """A batch of one utterance (most of a DP-FedSGD round's drawing devices): its gradient is its
        per-sample gradient, so it is taken by a plain backward with Opacus' hooks off (their
        activations and per-sample einsums cost a sixth of the step) and clipped with the factor
        ``clip_and_accumulate`` applies, ``min(1, C / (norm + 1e-6))`` (tests/test_fedsgd.py checks
        the two agree)."""
        gs_model.disable_hooks()
        try:
            loss = self.recognizer.losses(gs_model, self.recognizer.collate([example])).mean()
            with _output_gradient_hooks():
                grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        finally:
            gs_model.enable_hooks()
        got = {n: g for (n, _), g in zip(named, grads) if g is not None}
        norm = torch.stack([g.norm(2) for g in got.values()]).norm(2) if got else torch.tensor(0.0)
        factor = (max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
        return {n: g * factor for n, g in got.items()}


_PROCESS_MODULES: "weakref.WeakKeyDictionary[Recognizer, ClippingModule]" = weakref.WeakKeyDictionary()


def process_clipping_module(recognizer: Recognizer) -> ClippingModule:
    """This process's one :class:`ClippingModule` for ``recognizer`` (made at the first call, kept as
    long as the recognizer lives)."""
    module = _PROCESS_MODULES.get(recognizer)
    if module is None:
        module = _PROCESS_MODULES[recognizer] = ClippingModule(recognizer)
    return module


def per_sample_backward(gs_model: GradSampleModule, recognizer: Recognizer, batch: Batch) -> torch.Tensor:
    """Fill every trainable parameter's ``grad_sample`` for ``batch``; returns the mean loss.

    Only the per-sample gradients are used, so autograd is asked for the gradients of the inputs the
    recognizer names (:meth:`Recognizer.private_losses`) alone: it then skips the parameters' summed
    gradients (wasted work; ``.grad`` stays empty), while Opacus' hooks still receive every layer's
    output gradient.
    """
    losses, leaves = recognizer.private_losses(gs_model, batch)
    loss = losses.mean()
    with _output_gradient_hooks():
        loss.backward(inputs=leaves)
    return loss


@contextlib.contextmanager
def _output_gradient_hooks() -> Iterator[None]:
    """A first layer whose input needs no gradient (frozen below it) makes torch warn that its full
    backward hook fires on output gradients alone: exactly what Opacus' hooks use
    (tests/test_whisper.py checks the per-sample gradients this way). Silenced inside."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
        yield


def private_step(gs_model: GradSampleModule, optimizer: DPOptimizer, recognizer: Recognizer, batch: Batch) -> float:
    """One DP-SGD step on ``batch``: per-sample gradients, clipped, summed and noised; returns the loss."""
    optimizer.zero_grad(set_to_none=True)
    loss = per_sample_backward(gs_model, recognizer, batch)
    optimizer.step()
    return loss.item()
