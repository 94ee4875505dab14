"""Loss, non-private training steps and evaluation: the plain (non-DP) training path."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping, Optional, Sequence

import torch
from torch import nn

from fl.config import TrainConfig
from fl.data.features import Example
from fl.metrics import scores
from fl.model import Recognizer


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


def evaluation_devices(keys: Sequence[int], cap: int, seed: int, r: int) -> list[int]:
    """The devices that evaluate round ``r``'s model: all of ``keys``, or ``cap`` of them drawn by (seed, round).

    The server's federated evaluation and a simulation's experimenter-view evaluation draw the same
    devices (simulated devices' keys are their partition ids), so their figures are comparable."""
    keys = sorted(keys)
    if cap <= 0 or cap >= len(keys):
        return keys
    return sorted(random.Random(f"unheard-eval:{seed}:{r}").sample(keys, cap))


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


def plain_round(model: nn.Module, recognizer: Recognizer, examples: Sequence[Example], train: TrainConfig,
                seed: int, label: Optional[Callable[[Sequence[Example]], list[Example]]] = None) -> float:
    """Non-private local fine-tuning: ``train.local_steps`` AdamW steps; returns the mean loss (NaN
    when no step had a labelled recording).

    ``label`` (a :class:`fl.labels.Labeler`): applied to each drawn batch, which trains on the pairs it
    returns; a batch left empty is no step."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    batches = random_batches(examples, train.batch_size, random.Random(seed))
    model.train()
    losses: list[float] = []
    for _ in range(train.local_steps):
        batch = next(batches)
        batch = label(batch) if label is not None else batch
        if not batch:
            continue
        loss = recognizer.losses(model, recognizer.collate(batch)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return sum(losses) / len(losses) if losses else float("nan")


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """Learning-rate multiplier: linear warm-up then cosine decay to 5%."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class EvalResult:
    loss: float
    wer: float  # after Whisper's English normaliser (fl/metrics.py): the headline
    cer: float
    utterances: int
    raw_wer: float = float("nan")
    loops_cut: int = 0  # hypotheses whose runaway repetition (or length cap) decoding stopped


def _batches(examples: Sequence[Example], batch_size: int) -> Iterator[list[Example]]:
    """Length-sorted chunks (less padding)."""
    ordered = sorted(examples, key=lambda e: e.feats.shape[0])
    for i in range(0, len(ordered), batch_size):
        yield ordered[i : i + batch_size]


@torch.no_grad()
def evaluate(recognizer: Recognizer, model: nn.Module, examples: Sequence[Example], batch_size: int = 16
             ) -> EvalResult:
    """Mean loss and corpus WER/CER of greedy decoding over ``examples`` (in eval mode, under
    ``model.autocast``: :meth:`Recognizer.autocast`); every example needs its reference transcript."""
    if not examples:
        raise ValueError("cannot evaluate on an empty set")
    unlabelled = sum(e.text is None for e in examples)
    if unlabelled:
        raise ValueError(f"evaluation needs reference transcripts: {unlabelled} of the {len(examples)} recordings "
                         "have none (an unlabelled corpus cannot score a model: set data.eval_path to a labelled one)")
    was_training = model.training
    model.eval()
    refs, hyps, loss_sum, loops = [], [], 0.0, 0
    try:
        for chunk in _batches(examples, batch_size):
            batch = recognizer.collate(chunk)
            with recognizer.autocast():
                loss_sum += float(recognizer.losses(model, batch).sum())
                out = recognizer.transcribe(model, batch)
            hyps += out.texts
            loops += out.loops_cut
            refs += [e.text for e in chunk]
    finally:
        model.train(was_training)
    s = scores(refs, hyps)
    return EvalResult(loss_sum / len(examples), s.wer, s.cer, len(examples), s.raw_wer, loops)


@torch.no_grad()
def utterance_losses(recognizer: Recognizer, model: nn.Module, examples: Sequence[Example], batch_size: int = 16
                     ) -> dict[str, float]:
    """Each example's loss per target token under ``model`` (eval mode, under ``model.autocast``), by example id."""
    was_training = model.training
    model.eval()
    out: dict[str, float] = {}
    try:
        for chunk in _batches(examples, batch_size):
            with recognizer.autocast():
                losses = recognizer.losses(model, recognizer.collate(chunk))
            out.update((e.id, float(v)) for e, v in zip(chunk, losses))
    finally:
        model.train(was_training)
    return out
