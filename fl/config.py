"""Typed configuration schema, registered with Hydra's ConfigStore.

Every YAML file under ``conf/`` is merged onto these dataclasses, so a typo or a wrong type in a
config or on the command line is rejected before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore


@dataclass
class DataConfig:
    """Where speech comes from and how it is split into devices.

    ``corpus`` is ``embedded`` (synthetic eSpeak NG speech, generated on first use) or a reader
    kind (``kaldi``, ``fsdd``, ``librispeech``, ``manifest``) with ``path``.
    """

    corpus: str = "embedded"
    path: Optional[str] = None
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
    cache_dir: str = "${oc.env:UNHEARD_CACHE,${hydra:runtime.cwd}/.cache}"


@dataclass
class ModelConfig:
    """A batch-first Conformer CTC acoustic model (no BatchNorm, no nn.LSTM: Opacus-safe)."""

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
    (``.`` = all). Training fewer values is the usual way to make DP-SGD useful on small devices.
    """

    local_steps: int = 8
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.0
    trainable: str = "."


@dataclass
class SamplePrivacyConfig:
    """Utterance-level DP-SGD on the device (Opacus)."""

    noise_multiplier: float = 0.8
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    accountant: str = "rdp"
    secure_mode: bool = False


@dataclass
class PrivacyConfig:
    """``name`` is ``none`` or ``sample``; ``sample`` is null when sample-level DP is off."""

    name: str = "sample"
    sample: Optional[SamplePrivacyConfig] = field(default_factory=SamplePrivacyConfig)


@dataclass
class FederationConfig:
    """Rounds, cohort and the simulation backend's resources."""

    rounds: int = 6
    clients_per_round: int = 6
    num_cpus_per_client: float = 1.0
    threads_per_client: int = 1
    round_timeout: float = 3600.0


@dataclass
class Config:
    """The root config of one run."""

    name: str = "default"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)


def register_configs() -> None:
    """Register the root schema as ``schema`` so ``conf/config.yaml`` can build on it."""
    ConfigStore.instance().store(name="schema", node=Config)
