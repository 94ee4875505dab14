"""The model contract: what every training, privacy, evaluation and audit path needs of a recognizer.

A :class:`Recognizer` is one model family (the Conformer-CTC trained from scratch, or a pretrained
Whisper) behind six operations: features for audio, a tokenizer, a per-example loss for a batch,
transcription of a batch (with a confidence score, for pseudo-labels), the selection of trainable parameters, and the split of the model's
weights into what the federation shares (travels, is averaged, is checkpointed) and what every
party loads itself from the seed. DP-SGD, DP-FedAvg, evaluation, the audit and pretraining are
written against this contract, never against one model.

A recognizer also owns where its modules run: the ``device`` key (resolved by
:func:`fl.config.resolve_device` in the process that uses it, so a pickled recognizer resolves it
again in a simulation's actor). Modules and batches live there; what leaves a module -- its
features and its shared weights -- is always on the CPU, so files and messages are the same
whatever the device. ``model.autocast`` applies to inference only (:meth:`Recognizer.autocast`).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from typing import Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

from fl.config import ModelConfig, resolve_device
from fl.data.features import Batch, Example, collate

AUTOCAST_DTYPES: dict[str, Optional[torch.dtype]] = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
"""``model.autocast`` -> the dtype of ``torch.autocast`` (None: no autocast)."""


@dataclass(frozen=True)
class Transcripts:
    """Decoded text of a batch; ``loops_cut`` counts hypotheses whose runaway repetition was stopped."""

    texts: list[str]
    loops_cut: int = 0


class Recognizer(ABC):
    """One ASR model family: stateless about weights (a module is passed in), so one instance serves
    the server, every simulated device and every evaluation of a run."""

    kind: str
    cfg: ModelConfig
    device_spec: str
    """The ``device`` key this recognizer's modules and batches run on (resolved where it is used)."""
    pretrained: bool
    """True: the seed comes pretrained (no central pretraining on public speakers)."""
    trainable: str
    """Regex over parameter names: the parameters that train (and, see :meth:`shared`, travel)."""

    # -- audio and text ---------------------------------------------------------------------------
    @property
    @abstractmethod
    def feature_key(self) -> str:
        """Everything the cached features depend on (the feature cache's key includes it)."""

    @property
    def max_seconds(self) -> float:
        """The longest audio the model takes; longer recordings are skipped with a reason."""
        return float("inf")

    @property
    def device(self) -> torch.device:
        """The torch device :attr:`device_spec` resolves to in this process."""
        return resolve_device(self.device_spec)

    def autocast(self) -> AbstractContextManager:
        """``torch.autocast`` at ``model.autocast`` on :attr:`device`, or nothing (``none``).

        For inference only: featurising with a frozen encoder, evaluation and decoding. No training
        path (plain steps, DP-SGD, DP-FedSGD's clipped sums) enters it, so per-sample gradients,
        clipping and noise keep their float32/float64 arithmetic.
        """
        dtype = AUTOCAST_DTYPES[self.cfg.autocast]
        return nullcontext() if dtype is None else torch.autocast(self.device.type, dtype=dtype)

    @abstractmethod
    def features(self, audio: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """Model input for each 16 kHz waveform, as stored in :class:`Example` (``[frames, ...]``), on the CPU."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Target token ids of a transcript (what :attr:`Example.tokens` holds)."""

    def collate(self, examples: Sequence[Example]) -> Batch:
        """Zero-pad ``examples`` into one batch on :attr:`device`."""
        return collate(examples).to(self.device)

    # -- the model --------------------------------------------------------------------------------
    @abstractmethod
    def new_module(self) -> nn.Module:
        """A fresh copy of the seed architecture (pretrained weights where the family has them) on
        :attr:`device`, with :attr:`trainable` applied to ``requires_grad``."""

    @abstractmethod
    def losses(self, module: nn.Module, batch: Batch) -> torch.Tensor:
        """Per-example loss ``[B]``, normalised by target length (``module`` may be Opacus-wrapped)."""

    def private_losses(self, module: nn.Module, batch: Batch) -> tuple[torch.Tensor, Optional[list[torch.Tensor]]]:
        """:meth:`losses` plus the leaf inputs from which autograd reaches every trainable layer.

        DP-SGD only needs the layers' output gradients (Opacus' hooks), so it asks autograd for the
        leaves' gradients alone and skips the summed parameter gradients. ``None``: no such leaves
        (a full backward is needed).
        """
        feats = batch.feats.detach().requires_grad_()
        return self.losses(module, replace(batch, feats=feats)), [feats]

    @abstractmethod
    def transcribe(self, module: nn.Module, batch: Batch) -> Transcripts:
        """Text of every example of ``batch`` (greedy; in eval mode, without gradients)."""

    @abstractmethod
    def transcribe_with_confidence(self, module: nn.Module, batch: Batch) -> list[tuple[str, float]]:
        """:meth:`transcribe`'s text of every example with its confidence: the greedy decode's mean
        log-probability per decoding step (higher is surer; -inf for a decoding that was cut). What
        ``train.pseudo_threshold`` is compared with (``fl/labels.py``)."""

    def select_trainable(self, module: nn.Module) -> int:
        """Set ``requires_grad`` from :attr:`trainable`; returns how many values train.

        Fine-tuning a small part of the model is what makes DP-SGD useful on small per-device data:
        the noise grows with the number of trained values, the signal does not.
        """
        pattern = re.compile(self.trainable)
        count = 0
        for name, p in module.named_parameters():
            p.requires_grad_(bool(pattern.search(name)))
            count += p.numel() if p.requires_grad else 0
        if count == 0:
            raise ValueError(f"train.trainable={self.trainable!r} matches no parameter of the {self.kind} model")
        return count

    def shared(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """The weights the federation shares: sent to devices, updated, averaged, checkpointed.

        Default: the whole state. Families with a pinned pretrained seed share only the trainable
        parameters; the frozen rest is loaded by every party from that seed. Always CPU tensors (the
        module's own on the CPU, copies from any other device): they travel and are saved.
        """
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}

    def load_shared(self, module: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
        """Load shared weights into ``module`` (exactly the keys of :meth:`shared`, copied onto the
        module's device); returns it."""
        expected = set(self.shared(module))
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ValueError(f"shared weights do not fit the {self.kind} model: missing {missing[:3]}, "
                             f"unexpected {extra[:3]}")
        module.load_state_dict(dict(state), strict=False)
        return module

    def module_from(self, state: Mapping[str, torch.Tensor]) -> nn.Module:
        """A seed module with ``state`` (shared weights) loaded."""
        return self.load_shared(self.new_module(), state)


def build_recognizer(cfg: ModelConfig, trainable: Optional[str] = None, device: str = "cpu") -> Recognizer:
    """The recognizer ``cfg.kind`` names; ``trainable`` (``train.trainable``) overrides its default selection;
    ``device``: the run's ``device`` key (checked here, resolved again wherever the recognizer is used)."""
    resolve_device(device)
    # imported here: the Whisper family pulls in transformers, which a Conformer run never needs
    if cfg.kind == "conformer":
        from fl.model.conformer import ConformerRecognizer
        return ConformerRecognizer(cfg, trainable, device)
    if cfg.kind == "whisper":
        from fl.model.whisper import WhisperRecognizer
        return WhisperRecognizer(cfg, trainable, device)
    raise ValueError(f"model.kind must be 'conformer' or 'whisper', not {cfg.kind!r}")
