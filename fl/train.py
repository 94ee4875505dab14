"""Loss, non-private training steps and evaluation: the plain (non-DP) training path."""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fl.config import TrainConfig
from fl.data.features import Batch, Example, collate
from fl.data.text import CharTokenizer
from fl.metrics import error_rates, greedy_decode


def ctc_losses(model: nn.Module, batch: Batch, blank: int) -> torch.Tensor:
    """Per-example CTC loss, normalised by transcript length: ``[B]``."""
    log_probs, out_lens = model(batch.feats, batch.feat_lens)
    losses = F.ctc_loss(
        log_probs.transpose(0, 1),
        batch.targets,
        out_lens,
        batch.target_lens,
        blank=blank,
        reduction="none",
        zero_infinity=True,
    )
    return losses / batch.target_lens.clamp_min(1)


def random_batches(examples: Sequence[Example], batch_size: int, rng: random.Random) -> Iterable[list[Example]]:
    """Endless shuffled fixed-size batches (epoch after epoch)."""
    if not examples:
        raise ValueError("cannot draw batches from an empty dataset")
    order = list(range(len(examples)))
    while True:
        rng.shuffle(order)
        size = min(batch_size, len(order))
        for i in range(0, len(order) - size + 1, size):
            yield [examples[j] for j in order[i : i + size]]

def freeze_except(model: nn.Module, trainable: str) -> int:
    """Train only parameters whose name matches the regex ``trainable``; returns how many values train.

    Fine-tuning a small part of the model is what makes DP-SGD useful on tiny per-device data: the
    noise DP-SGD adds grows with the number of trained values, the signal does not.
    """
    pattern = re.compile(trainable)
    count = 0
    for name, p in model.named_parameters():
        p.requires_grad_(bool(pattern.search(name)))
        count += p.numel() if p.requires_grad else 0
    if count == 0:
        raise ValueError(f"train.trainable={trainable!r} matches no parameter of the model")
    return count


def adam_step_bound(t: int, beta1: float = 0.9, beta2: float = 0.999) -> float:
    """The largest |m_hat / sqrt(v_hat)| of step ``t`` of Adam from a fresh state, whatever the gradients.

    By Cauchy-Schwarz, |m_t| <= (1 - b1) sqrt(sum_{k<t} (b1^2/b2)^k) sqrt(v_t / (1 - b2)); with the bias
    corrections the ratio is at most that times sqrt(1 - b2^t) / (1 - b1^t) (1 at t = 1; about 1.03
    at t = 8 for the default betas). Adam's epsilon only makes the step smaller.
    """
    ratio = beta1 * beta1 / beta2
    return (math.sqrt(sum(ratio**k for k in range(t))) * (1 - beta1) / math.sqrt(1 - beta2)
            * math.sqrt(1 - beta2**t) / (1 - beta1**t))


def max_update_norm(train: TrainConfig, reference: Mapping[str, torch.Tensor]) -> float:
    """The largest L2 norm an honest device's update can have after ``train.local_steps`` steps of a
    fresh AdamW (default betas; the plain and the DP-SGD path alike) from the weights ``reference``:
    step t moves every coordinate by at most ``lr * adam_step_bound(t)`` plus the decoupled weight
    decay ``lr * wd * |w|``. The server drops updates above it when no user-level clipping bounds them."""
    floats = [v for v in reference.values() if v.is_floating_point()]
    numel = sum(v.numel() for v in floats)
    weights = math.sqrt(sum(float(torch.linalg.vector_norm(v.double())) ** 2 for v in floats))
    adam = train.lr * math.sqrt(numel) * sum(adam_step_bound(t) for t in range(1, train.local_steps + 1))
    decay = train.lr * train.weight_decay * train.local_steps * (weights + adam)  # |w| never exceeds weights + adam
    return (adam + decay) * 1.01


def plain_round(model: nn.Module, examples: Sequence[Example], train: TrainConfig,
                blank: int, n_mels: int, seed: int) -> float:
    """Non-private local fine-tuning: ``train.local_steps`` AdamW steps; returns the mean loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    batches = random_batches(examples, train.batch_size, random.Random(seed))
    model.train()
    total = 0.0
    for _ in range(train.local_steps):
        loss = ctc_losses(model, collate(next(batches), n_mels), blank).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item()
    return total / train.local_steps


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """Learning-rate multiplier: linear warm-up then cosine decay to 5%."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class EvalResult:
    loss: float
    wer: float
    cer: float
    utterances: int


def _scored_batches(
    model: nn.Module, examples: Sequence[Example], blank: int, n_mels: int, batch_size: int
) -> Iterator[tuple[list[Example], torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Length-sorted batches in eval mode: ``(examples, log_probs, out_lens, per-example loss)``."""
    was_training = model.training
    model.eval()
    ordered = sorted(examples, key=lambda e: e.feats.shape[0])
    try:
        for i in range(0, len(ordered), batch_size):
            chunk = ordered[i : i + batch_size]
            batch = collate(chunk, n_mels)
            log_probs, out_lens = model(batch.feats, batch.feat_lens)
            loss = F.ctc_loss(
                log_probs.transpose(0, 1), batch.targets, out_lens, batch.target_lens,
                blank=blank, reduction="none", zero_infinity=True,
            ) / batch.target_lens.clamp_min(1)
            yield chunk, log_probs, out_lens, loss
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate(
    model: nn.Module, examples: Sequence[Example], tokenizer: CharTokenizer, n_mels: int, batch_size: int = 32
) -> EvalResult:
    """Mean CTC loss and corpus WER/CER of greedy decoding over ``examples``."""
    if not examples:
        raise ValueError("cannot evaluate on an empty set")
    refs, hyps, loss_sum = [], [], 0.0
    for chunk, log_probs, out_lens, loss in _scored_batches(model, examples, tokenizer.blank, n_mels, batch_size):
        loss_sum += float(loss.sum())
        hyps += greedy_decode(log_probs, out_lens, tokenizer)
        refs += [e.text for e in chunk]
    wer, cer = error_rates(refs, hyps)
    return EvalResult(loss_sum / len(examples), wer, cer, len(examples))


@torch.no_grad()
def utterance_losses(
    model: nn.Module, examples: Sequence[Example], blank: int, n_mels: int, batch_size: int = 32
) -> dict[str, float]:
    """Each example's CTC loss per transcript character under ``model``, by example id."""
    out: dict[str, float] = {}
    for chunk, _, _, loss in _scored_batches(model, examples, blank, n_mels, batch_size):
        out.update((e.id, float(v)) for e, v in zip(chunk, loss))
    return out
