"""From a ``DataConfig`` to the three disjoint sets a run needs.

* public: synthetic eSpeak NG speakers (plus any real corpus declared public with
  ``data.public_corpus``) -> central pretraining of a seed model trained from scratch (a pretrained
  recognizer needs none);
* devices: private speakers, one simulated device each (or IID/Dirichlet shards), each with its
  own train and local test split;
* held-out: speakers that no device holds (``eval_speakers`` drawn from the private pool, or the
  separate ``eval_path`` corpus) -> server-side evaluation.
Public speakers never appear in the other two sets, and held-out speakers are on no device.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from fl.config import DataConfig
from fl.data.embedded import build_embedded_corpus
from fl.data.features import Example, featurize
from fl.data.fleet import DeviceData
from fl.data.partition import partition, split_device, split_key
from fl.data.readers import Problem, read_corpus
from fl.data.records import Utterance, group_by_speaker
from fl.model import Recognizer

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    public_train: list[Example]
    public_dev: list[Example]
    devices: dict[str, DeviceData]
    held_out: list[Example]
    problems: list[Problem]


class DataNotFound(FileNotFoundError):
    """A configured corpus path does not exist (the message says which key to set)."""


def check_paths(cfg: DataConfig) -> None:
    """Fail early, naming the config key, when a configured corpus is not on this machine."""
    if cfg.corpus != "embedded" and not cfg.path:
        raise DataNotFound(f"data.corpus={cfg.corpus} needs data.path (the corpus folder or manifest)")
    for key, value in (("data.path", cfg.path), ("data.eval_path", cfg.eval_path),
                       ("data.public_path", cfg.public_path)):
        if value and not Path(value).exists():
            raise DataNotFound(
                f"{key}={value} does not exist. The presets look for the corpora in ../shared/data beside the "
                f"checkout (override with UNHEARD_DATA=/path/to/data or {key}=...); see conf/data/README.md"
            )


def _private_pool(cfg: DataConfig, embedded_private: list[Utterance]) -> tuple[list[Utterance], list[Problem]]:
    if cfg.corpus == "embedded":
        return embedded_private, []
    result = read_corpus(cfg.corpus, str(cfg.path))
    return result.utterances, result.problems


def _cap_speakers(pool: list[Utterance], limit: int, rng: random.Random) -> list[Utterance]:
    if not limit:
        return pool
    speakers = sorted(group_by_speaker(pool))
    keep = set(rng.sample(speakers, min(limit, len(speakers))))
    return [u for u in pool if u.speaker in keep]


def _cap_examples(examples: list[Example], limit: int, rng: random.Random) -> list[Example]:
    """At most ``limit`` examples (0 = all), drawn evenly over speakers, in a stable order."""
    if not limit or len(examples) <= limit:
        return examples
    by_speaker: dict[str, list[Example]] = {}
    for e in examples:
        by_speaker.setdefault(e.speaker, []).append(e)
    queues = [rng.sample(v, len(v)) for _, v in sorted(by_speaker.items())]
    picked: list[Example] = []
    while len(picked) < limit:
        for q in queues:
            if q and len(picked) < limit:
                picked.append(q.pop())
    return sorted(picked, key=lambda e: e.id)


def _by_id(examples: Sequence[Example]) -> dict[str, Example]:
    return {e.id: e for e in examples}


def _require_references(examples: Sequence[Example], what: str) -> None:
    """Evaluation scores against transcripts: refuse an evaluation set without them, saying what to do."""
    missing = sum(e.text is None for e in examples)
    if missing:
        raise ValueError(f"{what}: {missing} of {len(examples)} recordings have no transcript, and evaluation needs "
                         "references; set data.eval_path to a labelled corpus (data.eval_speakers=0)")


def _unlabelled(examples: Sequence[Example]) -> list[Example]:
    """``examples`` without their transcripts (``data.drop_transcripts``: a device that has none)."""
    return [replace(e, text=None, tokens=e.tokens[:0]) for e in examples]


def _eval_corpus(cfg: DataConfig, recognizer: Recognizer, feats_dir: Path,
                 device_speakers: set[str]) -> tuple[list[Example], list[Problem]]:
    """The separate evaluation corpus; it must share no speaker with the devices."""
    result = read_corpus(cfg.corpus, str(cfg.eval_path))
    shared = device_speakers & set(group_by_speaker(result.utterances))
    if shared:
        raise ValueError(f"data.eval_path shares {len(shared)} speakers with the devices (e.g. {sorted(shared)[0]}): "
                         "evaluation speakers must never be trained on")
    feats = featurize(result.utterances, recognizer, feats_dir, cfg.max_seconds)
    return feats.examples, result.problems + feats.problems


def _public_sets(cfg: DataConfig, recognizer: Recognizer, seed: int, rng: random.Random, needed: bool
                 ) -> tuple[list[Example], list[Example], list[Utterance], list[Problem]]:
    """(public train, public dev, the embedded private utterances, problems): what the seed model sees.

    ``needed=False`` (a pretrained seed, and no other use): the public sets are left empty, unfeaturised;
    a pretrained seed that needs them (a deployment's evaluation set) gets a random tenth as public dev.
    """
    corpus = build_embedded_corpus(  # private speakers do not depend on the public ones: none made if unneeded
        Path(cfg.cache_dir) / "embedded", n_public=cfg.public_speakers if needed else 0,
        n_private=cfg.private_speakers, public_utterances=cfg.public_utterances,
        private_utterances=cfg.private_utterances, seed=seed, shift=cfg.shift,
    )
    public_utts, problems = list(corpus.public), []
    if not needed:
        return [], [], corpus.private, problems
    if cfg.public_corpus:
        extra = read_corpus(cfg.public_corpus, str(cfg.public_path))
        public_utts += extra.utterances
        problems += extra.problems
    if recognizer.pretrained:  # no pretraining: only an evaluation-sized random tenth is featurised
        public_utts = rng.sample(public_utts, max(1, len(public_utts) // 10)) if public_utts else []
        public = featurize(public_utts, recognizer, Path(cfg.cache_dir) / "features", cfg.max_seconds)
        return [], list(public.examples), corpus.private, problems + public.problems
    public = featurize(public_utts, recognizer, Path(cfg.cache_dir) / "features", cfg.max_seconds)
    public_ex = list(public.examples)
    rng.shuffle(public_ex)
    n_dev = max(1, len(public_ex) // 10)
    return public_ex[n_dev:], public_ex[:n_dev], corpus.private, problems + public.problems


@dataclass
class ServerData:
    public_train: list[Example]
    public_dev: list[Example]
    held_out: list[Example]
    problems: list[Problem]


def prepare_server_data(cfg: DataConfig, recognizer: Recognizer, seed: int) -> ServerData:
    """What a deployed server holds: the public sets (seed model) and its evaluation set.

    The evaluation set is the ``eval_path`` corpus when configured, else the public dev split.
    Devices' data (``data.path``) is never read: in a deployment it is on the devices.
    """
    rng = random.Random(seed)
    needed = not recognizer.pretrained or not cfg.eval_path  # the public dev split is then the evaluation set
    public_train, public_dev, _, problems = _public_sets(cfg, recognizer, seed, rng, needed)
    held_out = public_dev
    if cfg.eval_path:
        if not Path(cfg.eval_path).exists():
            raise DataNotFound(f"data.eval_path={cfg.eval_path} does not exist")
        held_out, eval_problems = _eval_corpus(cfg, recognizer, Path(cfg.cache_dir) / "features", set())
        problems += eval_problems
    _require_references(held_out, "the server's evaluation set")
    return ServerData(public_train, public_dev, _cap_examples(held_out, cfg.eval_utterances, rng), problems)


def prepare_data(cfg: DataConfig, recognizer: Recognizer, seed: int) -> PreparedData:
    """Public sets, devices and held-out speakers for a simulation (see the module docstring)."""
    check_paths(cfg)
    rng = random.Random(seed)
    public_train, public_dev, embedded_private, problems = _public_sets(cfg, recognizer, seed, rng,
                                                                        needed=not recognizer.pretrained)
    pool, pool_problems = _private_pool(cfg, embedded_private)
    problems += pool_problems
    pool = _cap_speakers(pool, cfg.max_speakers, rng)
    feats_dir = Path(cfg.cache_dir) / "features"
    private = featurize(pool, recognizer, feats_dir, cfg.max_seconds)
    problems += private.problems

    kept = _by_id(private.examples)
    speakers = sorted(group_by_speaker(u for u in pool if u.id in kept))
    if cfg.eval_speakers >= len(speakers):
        raise ValueError(
            f"data.eval_speakers={cfg.eval_speakers} leaves no device: the private pool has {len(speakers)} speakers"
        )
    held_speakers = set(rng.sample(speakers, cfg.eval_speakers))
    held_out = [e for e in private.examples if e.speaker in held_speakers]
    if cfg.eval_path:
        held_out, eval_problems = _eval_corpus(cfg, recognizer, feats_dir, set(speakers))
        problems += eval_problems
    held_out = _cap_examples(held_out, cfg.eval_utterances, rng)
    _require_references(held_out, "the held-out speakers")
    device_utts = [u for u in pool if u.id in kept and u.speaker not in held_speakers]
    shards = partition(device_utts, cfg.partition, cfg.num_devices, seed, cfg.dirichlet_alpha)
    devices: dict[str, DeviceData] = {}
    for device_id, utts in shards.items():
        if len(utts) < 2:
            problems.append(Problem(device_id, "device has fewer than 2 usable utterances: left out"))
            continue
        train, test = split_device(utts, cfg.test_fraction, split_key(seed, device_id))
        if not train:  # kept, as a deployed device with no training recordings: declines, or noise alone under DP
            log.warning("device %s: all %d utterances fell in its test split: none to train on", device_id, len(utts))
        train_ex = [kept[u.id] for u in train]
        devices[device_id] = DeviceData(device_id, _unlabelled(train_ex) if cfg.drop_transcripts else train_ex,
                                        [kept[u.id] for u in test])
    log.info(
        "data: %d public train / %d public dev utterances, %d devices, %d held-out utterances, %d problems",
        len(public_train), len(public_dev), len(devices), len(held_out), len(problems),
    )
    return PreparedData(public_train, public_dev, devices, held_out, problems)
