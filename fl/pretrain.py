"""Central, non-private pretraining of the seed model on public speakers (cached on disk).

Only data declared public reaches this module; private (device) speakers never do. The seed
checkpoint is keyed by the model and pretraining settings, the seed and the training data, so a
second run with the same settings reuses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from rich.progress import Progress

from fl.augment import spec_augment
from fl.config import ModelConfig, PretrainConfig
from fl.data.features import Example
from fl.model import Recognizer
from fl.train import EvalResult, evaluate, random_batches, warmup_cosine

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SeedModel:
    state_dict: dict[str, torch.Tensor]  # the shared weights (``Recognizer.shared``)
    path: Path
    dev: Optional[EvalResult]


def _key(recognizer: Recognizer, model: ModelConfig, cfg: PretrainConfig, seed: int, train: Sequence[Example]) -> str:
    """The seed checkpoint's cache key. ``model.autocast`` (it only changes the stored dev score) and a
    non-CPU device (other rounding) count only when set, so a CPU run's key is what it always was."""
    settings = asdict(model)
    if model.autocast == "none":
        del settings["autocast"]
    parts: list = [settings, asdict(cfg), seed, recognizer.feature_key, recognizer.trainable]
    if recognizer.device.type != "cpu":
        parts.append(recognizer.device.type)
    h = hashlib.sha256(json.dumps(parts, sort_keys=True).encode())
    for e in train:
        h.update(e.id.encode())
    return h.hexdigest()[:16]


def pretrain_seed(
    recognizer: Recognizer,
    model_cfg: ModelConfig,
    cfg: PretrainConfig,
    train: Sequence[Example],
    dev: Sequence[Example],
    cache_dir: Path,
    seed: int,
) -> SeedModel:
    """Train (or load from cache) the seed model; ``dev`` is only used to report its quality.

    A pretrained recognizer's seed is its own (nothing trains here); it is evaluated on ``dev`` if given.
    """
    path = Path(cache_dir) / f"seed-{_key(recognizer, model_cfg, cfg, seed, train)}.pt"
    if path.exists():
        blob = torch.load(path, weights_only=False)
        log.info("reusing seed model %s", path)
        return SeedModel(blob["state_dict"], path, blob["dev"])
    torch.manual_seed(seed)
    model = recognizer.new_module()
    if recognizer.pretrained:
        return _save(path, recognizer.shared(model), evaluate(recognizer, model, dev) if dev else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, cfg.warmup, cfg.steps)
    )
    batches = random_batches(train, cfg.batch_size, random.Random(seed))
    masks = torch.Generator().manual_seed(seed)
    model.train()
    with Progress(transient=True) as progress:
        task = progress.add_task("pretraining seed model", total=cfg.steps)
        for step in range(1, cfg.steps + 1):
            batch = recognizer.collate(next(batches))
            if cfg.spec_augment:
                batch = spec_augment(batch, masks)
            loss = recognizer.losses(model, batch).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
            schedule.step()
            progress.update(task, advance=1, description=f"pretraining seed model (loss {loss.item():.2f})")
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                r = evaluate(recognizer, model, dev)
                log.info("pretrain step %d: loss %.3f, dev WER %.3f CER %.3f", step, loss.item(), r.wer, r.cer)
    result = evaluate(recognizer, model, dev)
    log.info("seed model: dev WER %.3f CER %.3f", result.wer, result.cer)
    return _save(path, recognizer.shared(model), result)


def _save(path: Path, shared: dict[str, torch.Tensor], dev: Optional[EvalResult]) -> SeedModel:
    state = {k: v.detach().clone() for k, v in shared.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"state_dict": state, "dev": dev}, tmp)
    tmp.replace(path)
    return SeedModel(state, path, dev)
