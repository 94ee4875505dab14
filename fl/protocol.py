"""The message contract between server and devices: record keys and metric names.

A device's reply carries only ``ARRAYS`` (model weights, the model's own shapes) and ``METRICS``
(scalars); nothing per utterance, no audio, features or transcripts. Under any privacy level a
training reply's metrics are only the echo of the mechanism's public parameters (the keys of
``fl.privacy.sample.SampleLevel`` and ``fl.privacy.user.UserRound``), the adaptive-clipping bit
and ``declined``; example counts, losses and test metrics are sent only without privacy
(``clients/guard.py`` enforces it, docs/privacy.md lists it).
"""

from typing import Any, Mapping

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"

# config keys sent by the server (the privacy parameters are the level objects' own keys)
ROUND = "server-round"

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

# the reply to the server's QUERY at the start of a run: the device's stable key (see server/devices.py)
DEVICE_KEY = "device-key"


def check_echo(sent: Mapping[str, float | int], metrics: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` unless ``metrics`` echo every parameter of ``sent`` exactly (as numbers)."""
    for key, value in sent.items():
        echoed = metrics.get(key)
        if isinstance(echoed, bool) or not isinstance(echoed, (int, float)) or float(echoed) != float(value):
            raise ValueError(f"device used {key}={echoed!r}, the server sent {value!r}")
