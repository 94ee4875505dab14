"""The bench's in-process figures (``unheard-bench``, :mod:`experiments.bench`, lists them): DP-SGD
and plain step times of the Conformer and of Whisper's trainable selections, the frozen encoder's
featurising rate and the cost of the ChaCha20 noise streams, each timed where :class:`Placement`
says (the CPU by default; on CUDA with ``torch.cuda.synchronize`` around the timers)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from typing import Callable, Mapping, Optional

import numpy as np
import torch

from fl.config import ModelConfig, TrainConfig, resolve_device
from fl.data.features import Batch
from fl.model import Recognizer, build_recognizer
from fl.model.whisper import DEFAULT_TRAINABLE
from fl.privacy.randomness import Secret, Stream
from fl.privacy.sample import SampleAccount, SampleLevel, private_step


@dataclass(frozen=True)
class Placement:
    """Where the bench measures: the ``device`` key of its in-process steps and of every simulation it
    runs, and, on CUDA, the share of the GPU each simulated device's actor asks Ray for."""

    device: str = "cpu"
    gpus_per_client: Optional[float] = None
    """None: 1 / this machine's CPUs on CUDA (ignored on the CPU)."""

    @property
    def torch_device(self) -> torch.device:
        return resolve_device(self.device)

    @property
    def cuda(self) -> bool:
        return self.torch_device.type == "cuda"

    @property
    def share(self) -> float:
        """The GPU share of a simulated device's actor (0 on the CPU)."""
        if not self.cuda:
            return 0.0
        return self.gpus_per_client if self.gpus_per_client is not None else 1.0 / max(1, os.cpu_count() or 1)

    def overrides(self) -> list[str]:
        """The simulation overrides that put its server and its devices here."""
        return [f"device={self.device}", f"federation.gpus_per_client={self.share}"]

    def sync(self) -> None:
        """Wait for the GPU's queued work (a timer must not stop before it ends); nothing on the CPU."""
        if self.cuda:
            torch.cuda.synchronize(self.torch_device)

    def info(self) -> dict[str, object]:
        """The fields that say where the figures were taken: the device, torch's threads, the CPUs (and
        on CUDA the GPU's name, its memory and the actors' share of it)."""
        info: dict[str, object] = {"device": str(self.torch_device), "threads": torch.get_num_threads(),
                                   "cpus": os.cpu_count()}
        if self.cuda:
            props = torch.cuda.get_device_properties(self.torch_device)
            info |= {"gpu": props.name, "gpu_memory_gb": props.total_memory / 1024**3, "gpus_per_client": self.share}
        return info


def _batch(feature_shape: tuple[int, ...], vocab: int, size: int, seconds: float, tokens: int) -> Batch:
    """A random batch of ``size`` examples with features of ``feature_shape`` and ``tokens`` targets."""
    g = torch.Generator().manual_seed(0)
    targets = torch.randint(1, vocab, (size, tokens), generator=g)
    return Batch(torch.randn(size, *feature_shape, generator=g), torch.full((size,), feature_shape[0]),
                 targets, torch.full((size,), tokens), torch.full((size,), seconds))


def conformer_batch(cfg: ModelConfig, size: int, seconds: float) -> Batch:
    """Log-mel frames of ``seconds`` and 60 characters an utterance."""
    return _batch((int(seconds * 100), cfg.n_mels), 29, size, seconds, 60)


def whisper_batch(recognizer: Recognizer, size: int, seconds: float = 4.0, tokens: int = 16) -> Batch:
    """Cached encoder states (or log-mel) of the recognizer's input window, ``tokens`` tokens each."""
    cfg = recognizer.config  # type: ignore[attr-defined]
    window = int(recognizer.max_seconds)
    shape = (window * 50, cfg.d_model) if recognizer.cached_encoder else (window * 100, cfg.num_mel_bins)  # type: ignore
    batch = _batch(shape, recognizer.eot, size, seconds, tokens)  # type: ignore[attr-defined]
    return replace(batch, targets=torch.cat([batch.targets[:, :-1], torch.full((size, 1), recognizer.eot)], 1))  # type: ignore


def _time(step: Callable[[], object], warmup: int, repeats: int, where: Placement = Placement()) -> float:
    for _ in range(warmup):
        step()
    where.sync()
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    where.sync()
    return (time.perf_counter() - started) / repeats


def step_seconds(recognizer: Recognizer, batch: Batch, repeats: int, where: Placement) -> tuple[float, float]:
    """Seconds per non-private AdamW step and per DP-SGD step (the production one) on ``batch``
    (moved to the recognizer's device)."""
    batch = batch.to(recognizer.device)
    torch.manual_seed(0)
    model = recognizer.new_module().train()
    plain_opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def plain() -> None:
        plain_opt.zero_grad(set_to_none=True)
        recognizer.losses(model, batch).mean().backward()
        plain_opt.step()

    torch.manual_seed(0)
    mechanism = SampleLevel(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.25, steps=1)
    gsm, dp_opt = mechanism.make_private(recognizer.new_module().train(),
                                         TrainConfig(lr=1e-5, batch_size=batch.feats.shape[0]),
                                         Secret.from_seed(0, "bench").stream("dp-step"))
    # alternate the two so that a slow spell of the machine hits both alike
    non_dp = dp = 0.0
    for _ in range(2):
        non_dp += _time(plain, 2, repeats, where) / 2
        dp += _time(lambda: private_step(gsm, dp_opt, recognizer, batch), 2, repeats, where) / 2
    return non_dp, dp


def dp_step(repeats: int, where: Placement, batch_size: int = 16, seconds: float = 4.0) -> dict[str, float]:
    """The Conformer (``model=conformer``): a batch of 16 utterances of 4 s."""
    figures = {}
    for label, cfg in (("", ModelConfig()), ("_no_dropout", ModelConfig(dropout=0.0))):
        non_dp, dp = step_seconds(build_recognizer(cfg, device=where.device),
                                  conformer_batch(cfg, batch_size, seconds), repeats, where)
        if not label:
            figures |= {"non_dp_seconds_per_step": non_dp, "dp_seconds_per_step": dp}
        figures[f"dp_step_ratio{label}"] = dp / non_dp
    return figures


WHISPER_RECIPES = {
    "decoder_biases_and_norms": DEFAULT_TRAINABLE,
    "decoder_norms": r"^model\.decoder\.(layers\.\d+\..*layer_norm|layer_norm)",
    "decoder_last_block_and_norms": r"^model\.decoder\.(layers\.3\.|layers\.\d+\..*layer_norm|layer_norm)",
    "decoder_blocks": r"^model\.decoder\.layers\.",
    "decoder_blocks_and_positions": r"^model\.decoder\.(layers\.|embed_positions)",
}
"""Trainable selections compared for the Whisper recipe (the preset, ``fl/model/whisper.py``, first)."""


def whisper_dp_step(repeats: int, where: Placement, batch_size: int = 8) -> dict[str, float]:
    """Whisper tiny.en with cached encoder outputs (10 s window), a batch of 8 utterances of 16
    tokens, for each selection of :data:`WHISPER_RECIPES`; ``whisper_dp_step_ratio`` is the preset's
    (and on CUDA ``whisper_dp_step_cuda_peak_gb`` the peak memory its steps allocated)."""
    figures: dict[str, float] = {}
    for name, trainable in WHISPER_RECIPES.items():
        recognizer = build_recognizer(ModelConfig(kind="whisper"), trainable, where.device)
        values = recognizer.select_trainable(recognizer.new_module())
        if where.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(where.torch_device)
        non_dp, dp = step_seconds(recognizer, whisper_batch(recognizer, batch_size), repeats, where)
        figures |= {f"whisper_{name}_values": values, f"whisper_{name}_non_dp_seconds": non_dp,
                    f"whisper_{name}_dp_seconds": dp, f"whisper_{name}_dp_step_ratio": dp / non_dp}
        if where.cuda and trainable == DEFAULT_TRAINABLE:
            figures["whisper_dp_step_cuda_peak_gb"] = torch.cuda.max_memory_allocated(where.torch_device) / 1024**3
    figures["whisper_dp_step_ratio"] = figures["whisper_decoder_biases_and_norms_dp_step_ratio"]
    return figures


def featurise(repeats: int, where: Placement, chunk: int = 16, seconds: float = 4.0,
              model: ModelConfig = ModelConfig(kind="whisper")) -> dict[str, float]:
    """Utterances per second through the frozen encoder of ``model`` (the Whisper seed), in chunks of
    ``chunk`` waveforms of ``seconds`` of noise (the encoder pads each to its window, so the content
    costs nothing); on CUDA also under bf16 autocast, where the GPU has bfloat16."""
    audio = [np.random.default_rng(i).standard_normal(int(seconds * 16_000)).astype(np.float32) * 0.1
             for i in range(chunk)]
    modes = ["none"] + (["bf16"] if where.cuda and torch.cuda.is_bf16_supported() else [])
    figures: dict[str, float] = {}
    for mode in modes:
        recognizer = build_recognizer(replace(model, autocast=mode), DEFAULT_TRAINABLE, where.device)
        label = "" if mode == "none" else f"_{mode}"
        figures[f"featurise{label}_utterances_per_second"] = chunk / _time(lambda: recognizer.features(audio),
                                                                          1, repeats, where)
    return figures


class _MersenneStream(Stream):
    """Gaussians as drawn before the ChaCha20 streams: torch's MT19937 seeded with 64 bits of the key
    (it keeps 32 of them: NOT private). A reference cost for ``secret_overhead`` only. The coins stay
    the key's ChaCha20 ones, so both releases train on the same Poisson batches (their sizes, not
    the generator, would otherwise decide the difference)."""

    def __init__(self, key: bytes) -> None:
        super().__init__(key)
        self.generator = torch.Generator().manual_seed(int.from_bytes(key[:8], "big"))

    def gaussian(self, shape, std, dtype=torch.float32, device="cpu", secure=False):  # type: ignore[no-untyped-def]
        return torch.normal(0.0, std, tuple(shape), generator=self.generator).to(dtype=dtype, device=device)


class _MersenneSecret(Secret):
    def stream(self, purpose: str, *index: int | str) -> Stream:
        return _MersenneStream(self.stream_key(purpose, *index))


def _release_seconds(recognizer: Recognizer, batch: Batch, repeats: int, where: Placement) -> tuple[float, float]:
    """Seconds of one device's training release (privacy=both, local noise: 2 DP-SGD steps at q =
    0.25 of 32 utterances, then the user-level share), with ChaCha20 streams and with MT19937's."""
    from fl.data.features import Example
    from fl.privacy.gaussian import model_delta
    from fl.privacy.user import UserRound

    n = batch.feats.shape[0]
    examples = [Example(f"u{i}", "s", batch.feats[i, : int(batch.feat_lens[i])].half(),
                        batch.targets[i, : int(batch.target_lens[i])], "x", float(batch.seconds[i])) for i in range(n)]
    mechanism = SampleLevel(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.25, steps=2)
    share = UserRound(noise_multiplier=1.0, clip_norm=1.0, noise_cohort=1)
    train = TrainConfig(local_steps=2, batch_size=8, lr=1e-4)

    def release(secret: Secret) -> None:
        torch.manual_seed(0)
        model = recognizer.new_module()
        base = {k: v.clone() for k, v in recognizer.shared(model).items()}
        mechanism.train(model, recognizer, examples, train, SampleAccount(), secret, 0)
        share.privatize(model_delta(recognizer.shared(model), base), secret, 0)

    key = Secret.generate().key
    chacha, mersenne = Secret(key), _MersenneSecret(key)
    release(chacha)  # warm-up: first-call costs (hooks, allocations) are neither's
    release(mersenne)
    times = {"chacha": 0.0, "mersenne": 0.0}
    for i in range(max(1, repeats)):
        pair = (("chacha", chacha), ("mersenne", mersenne))
        for name, s in pair if i % 2 == 0 else pair[::-1]:  # alternate the order
            times[name] += _time(lambda: release(s), 0, 1, where)
    return times["chacha"] / repeats, times["mersenne"] / repeats


def secret_overhead(repeats: int, where: Placement) -> dict[str, float]:
    """A release's cost with ChaCha20 draws over the same with torch's MT19937, the Conformer
    (1.3M values a step) and the Whisper preset (cached encoder outputs)."""
    figures: dict[str, float] = {}
    cfg = ModelConfig()
    whisper = build_recognizer(ModelConfig(kind="whisper"), DEFAULT_TRAINABLE, where.device)
    conformer = build_recognizer(cfg, device=where.device)
    for label, recognizer, batch in (("", conformer, conformer_batch(cfg, 32, 4.0)),
                                     ("whisper_", whisper, whisper_batch(whisper, 32))):
        chacha, mersenne = _release_seconds(recognizer, batch, repeats, where)
        figures |= {f"{label}release_seconds_chacha20": chacha, f"{label}release_seconds_mt19937": mersenne,
                    f"{label}secret_overhead": chacha / mersenne}
    return figures


STEPS: dict[str, Callable[[int, Placement], Mapping[str, object]]] = {
    "dp_step": dp_step, "whisper_dp_step": whisper_dp_step, "secret_overhead": secret_overhead,
    "featurise": featurise}
"""The in-process figures (``--repeats`` each)."""
