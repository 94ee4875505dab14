"""A real device's store: its own recordings in a data folder, and a state folder that persists.

The data folder is a Kaldi data dir (``wav.scp``/``text``/``utt2spk``) or a folder of recordings
with transcripts beside them (``clip.wav`` + ``clip.txt``). Features are cached in the state
folder; the device's secret, privacy ledger and round history live there too
(``clients/state.py``), so a restarted device continues its privacy accounting where it stopped,
and so does its key: a random number drawn once that names the device to the server across
restarts, whatever node id it gets, and says nothing about its owner or recordings. Unusable recordings
are skipped and listed in ``state/problems.jsonl``; a device with no training recordings left trains on
nothing: under DP it sends noise alone, else it declines every round.

Each usable recording is train or test by :func:`~fl.data.partition.split_device` under a key derived
from the device's own secret (``Secret.stream_key(SPLIT)``): a function of the recording's id and that
key only, so adding or removing a recording never moves another, and nobody without the secret can
choose or predict which recordings are test.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

from flwr.app import Context

from clients.state import DeviceState
from fl.data.features import featurize
from fl.data.fleet import DeviceData
from fl.data.partition import split_device
from fl.data.readers import read_corpus
from fl.data.records import Utterance
from fl.model import Recognizer
from fl.privacy.randomness import SPLIT

log = logging.getLogger(__name__)

DATA_DIR = "data-dir"
STATE_DIR = "state-dir"
"""The SuperNode ``--node-config`` keys ``unheard-device`` sets."""


def corpus_kind(data_dir: Path) -> str:
    """``kaldi`` for a Kaldi data dir, else ``folder``."""
    return "kaldi" if (data_dir / "wav.scp").is_file() else "folder"


def split_local(utterances: Sequence[Utterance], state_dir: Path, test_fraction: float
                ) -> tuple[list[Utterance], list[Utterance]]:
    """This device's (train, test): :func:`~fl.data.partition.split_device` keyed by its own secret."""
    key = DeviceState(state_dir).secret().stream_key(SPLIT)
    return split_device(utterances, test_fraction, key)


@lru_cache(maxsize=4)
def load_local_device(data_dir: str, state_dir: str, recognizer: Recognizer, test_fraction: float,
                      max_seconds: float) -> DeviceData:
    """Read, featurise (cached in the state folder) and split this device's recordings."""
    data, state = Path(data_dir), Path(state_dir)
    read = read_corpus(corpus_kind(data), data)
    feats = featurize(read.utterances, recognizer, state / "features", max_seconds)
    problems = read.problems + feats.problems
    state.mkdir(parents=True, exist_ok=True)
    (state / "problems.jsonl").write_text("".join(json.dumps(asdict(p)) + "\n" for p in problems))
    if problems:
        log.warning("%d recordings skipped (see %s on this device)", len(problems), state / "problems.jsonl")
    kept = {e.id: e for e in feats.examples}
    usable = [u for u in read.utterances if u.id in kept]
    train, test = split_local(usable, state, test_fraction)
    if not train:
        log.warning("no training recordings (%d usable, %d in the test split): this device trains on noise "
                    "alone under DP, else declines", len(usable), len(test))
    return DeviceData(data.name, [kept[u.id] for u in train], [kept[u.id] for u in test])


@dataclass(frozen=True)
class LocalDevice:
    """The :class:`~clients.client_app.DeviceStore` of a deployed SuperNode (paths from its node config)."""

    recognizer: Recognizer
    test_fraction: float
    max_seconds: float

    def data(self, context: Context) -> DeviceData:
        return load_local_device(str(context.node_config[DATA_DIR]), str(self.state(context)), self.recognizer,
                                 self.test_fraction, self.max_seconds)

    def state(self, context: Context) -> Path:
        return Path(str(context.node_config[STATE_DIR]))

    def key(self, context: Context) -> int:
        return DeviceState(self.state(context)).key()
