"""From a ``DataConfig`` to the three disjoint sets a run needs.

* public: synthetic eSpeak NG speakers, declared public -> central pretraining of the seed model;
* devices: private speakers, one simulated device each (or IID/Dirichlet shards), each with its
  own train and local test split;
* held-out: private-population speakers that no device holds -> server-side evaluation.
Public speakers never appear in the other two sets, and held-out speakers are on no device.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from fl.config import DataConfig
from fl.data.embedded import build_embedded_corpus
from fl.data.features import Example, featurize
from fl.data.fleet import DeviceData
from fl.data.partition import partition, split_device
from fl.data.readers import Problem, read_corpus
from fl.data.records import Utterance, group_by_speaker
from fl.data.text import CharTokenizer

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    public_train: list[Example]
    public_dev: list[Example]
    devices: dict[str, DeviceData]
    held_out: list[Example]
    problems: list[Problem]


def _private_pool(cfg: DataConfig, embedded_private: list[Utterance]) -> tuple[list[Utterance], list[Problem]]:
    if cfg.corpus == "embedded":
        return embedded_private, []
    if not cfg.path:
        raise ValueError(f"data.corpus={cfg.corpus} needs data.path (the corpus folder or manifest)")
    result = read_corpus(cfg.corpus, cfg.path)
    return result.utterances, result.problems


def _by_id(examples: Sequence[Example]) -> dict[str, Example]:
    return {e.id: e for e in examples}


def prepare_data(cfg: DataConfig, tokenizer: CharTokenizer, n_mels: int, seed: int) -> PreparedData:
    cache = Path(cfg.cache_dir)
    corpus = build_embedded_corpus(
        cache / "embedded", n_public=cfg.public_speakers, n_private=cfg.private_speakers,
        public_utterances=cfg.public_utterances, private_utterances=cfg.private_utterances,
        seed=seed, shift=cfg.shift,
    )
    pool, problems = _private_pool(cfg, corpus.private)
    feats_dir = cache / "features"
    public = featurize(corpus.public, tokenizer, n_mels, feats_dir, cfg.max_seconds)
    private = featurize(pool, tokenizer, n_mels, feats_dir, cfg.max_seconds)
    problems += public.problems + private.problems

    rng = random.Random(seed)
    public_ex = list(public.examples)
    rng.shuffle(public_ex)
    n_dev = max(1, len(public_ex) // 10)
    public_dev, public_train = public_ex[:n_dev], public_ex[n_dev:]

    kept = _by_id(private.examples)
    speakers = sorted(group_by_speaker(u for u in pool if u.id in kept))
    if cfg.eval_speakers >= len(speakers):
        raise ValueError(
            f"data.eval_speakers={cfg.eval_speakers} leaves no device: the private pool has {len(speakers)} speakers"
        )
    held_speakers = set(rng.sample(speakers, cfg.eval_speakers))
    held_out = [e for e in private.examples if e.speaker in held_speakers]
    device_utts = [u for u in pool if u.id in kept and u.speaker not in held_speakers]
    shards = partition(device_utts, cfg.partition, cfg.num_devices, seed, cfg.dirichlet_alpha)
    devices: dict[str, DeviceData] = {}
    for device_id, utts in shards.items():
        if len(utts) < 2:
            problems.append(Problem(device_id, "device has fewer than 2 usable utterances: left out"))
            continue
        train, test = split_device(utts, cfg.test_fraction, seed)
        devices[device_id] = DeviceData(device_id, [kept[u.id] for u in train], [kept[u.id] for u in test])
    log.info(
        "data: %d public train / %d public dev utterances, %d devices, %d held-out utterances, %d problems",
        len(public_train), len(public_dev), len(devices), len(held_out), len(problems),
    )
    return PreparedData(public_train, public_dev, devices, held_out, problems)
