"""The message contract between server and devices: record keys and metric names.

A device's reply carries only ``ARRAYS`` (model weights, the model's own shapes) and ``METRICS``
(scalars); nothing per utterance, no audio, features or transcripts. Under any privacy level a
training reply's metrics are only the echo of the mechanism's public parameters (the keys of
``fl.privacy.sample.SampleLevel`` and ``fl.privacy.user.UserRound``), the adaptive-clipping bit
and ``declined`` (a code of ``DECLINE_REASONS``); example counts, losses and test metrics are sent only without privacy
(``clients/guard.py`` enforces it, docs/privacy.md lists it). An error reply carries only a code
of ``DEVICE_ERRORS`` and that code's fixed text.
"""

from typing import Any, Mapping

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"

# config keys sent by the server (the privacy parameters are the level objects' own keys)
ROUND = "server-round"
RUN_NONCE = "run-nonce"  # 128 random bits drawn once per run (kept across resume): part of every request's
# identity on the device (clients/state.py), so no other run, even from the same seed model, is a repeat

# metric keys returned by devices without privacy only
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
WER = "wer"
CER = "cer"
LOSS = "loss"
WORDS = "words"
CHARS = "chars"

# metric keys of every mode
DECLINED = "declined"
CLIP_BIT = "clip-bit"

# Why a device declines a train request: ``declined`` carries one of these codes and nothing else
# (clients/policy.py checks every request against the device's own policy before training).
DECLINED_SAMPLE_BUDGET = 1  # its sample-level ledger would pass its own budget
DECLINED_SERVER_BUDGET = 2  # its server-facing user-level ledger would pass its own budget
DECLINED_NOISE_FLOOR = 3  # a noise multiplier below the device's floor (or no noise at all)
DECLINED_PLACEMENT = 4  # a user-level noise placement the device does not allow (central: a clear update)
DECLINED_REPLAY_DIFFERS = 5  # a request it already answered, whose reply would now differ (its data changed)
DECLINED_NO_DATA = 6  # no usable recordings (without privacy only: under DP a device trains on noise)
DECLINED_NO_TRANSCRIPTS = 7  # train.labels=transcripts, and none of its recordings has one (without privacy only)
DECLINE_REASONS: Mapping[int, str] = {
    DECLINED_SAMPLE_BUDGET: "sample-level budget spent",
    DECLINED_SERVER_BUDGET: "server-facing user-level budget spent",
    DECLINED_NOISE_FLOOR: "noise below the device's floor",
    DECLINED_PLACEMENT: "noise placement refused by the device",
    DECLINED_REPLAY_DIFFERS: "a repeated request whose reply would differ",
    DECLINED_NO_DATA: "no usable recordings",
    DECLINED_NO_TRANSCRIPTS: "no transcripts to train on (train.labels=transcripts)",
}


def decline_reason(code: Any) -> str:
    """What a log may say about a ``declined`` value: its fixed reason, or that it is not a known code."""
    known = isinstance(code, (int, float)) and not isinstance(code, bool) and float(code) in DECLINE_REASONS
    return DECLINE_REASONS[int(code)] if known else f"unknown decline code {code!r}"

# the reply to the server's QUERY at the start of a run: the device's stable key (see server/devices.py)
DEVICE_KEY = "device-key"

# A device's error reply carries one of these codes and exactly its fixed text: nothing of the
# exception (message, type, traceback, paths, transcripts) leaves the device; the device logs it
# locally (clients/guard.py). The codes start at 100, clear of Flower's own ErrorCode values (0-8).
ERROR_FAILED = 100
ERROR_TRAINING = 101
ERROR_OUTBOUND = 102
ERROR_EVALUATION_REFUSED = 103
ERROR_EVALUATION = 104
ERROR_SECURE_LEFT = 105
DEVICE_ERRORS: Mapping[int, str] = {
    ERROR_FAILED: "the device failed to handle the message",
    ERROR_TRAINING: "training failed on the device",
    ERROR_OUTBOUND: "the reply broke the outbound allow-list and was not sent",
    ERROR_EVALUATION_REFUSED: "federated evaluation is off under privacy",
    ERROR_EVALUATION: "evaluation failed on the device",
    ERROR_SECURE_LEFT: "the device left the secure-aggregation round (no update to contribute)",
}


def error_text(code: int) -> str:
    """What a log may say about an error reply: the fixed text of a device code, or Flower's code."""
    return DEVICE_ERRORS.get(code, f"Flower error code {code}")


def check_echo(sent: Mapping[str, float | int], metrics: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` unless ``metrics`` echo every parameter of ``sent`` exactly (as numbers)."""
    for key, value in sent.items():
        echoed = metrics.get(key)
        if isinstance(echoed, bool) or not isinstance(echoed, (int, float)) or float(echoed) != float(value):
            raise ValueError(f"device used {key}={echoed!r}, the server sent {value!r}")
