"""The message contract between server and devices: record keys and metric names.

A device's reply carries only ``ARRAYS`` (model weights, the model's own shapes) and ``METRICS``
(scalars); nothing per utterance, no audio, features or transcripts.
"""

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"

# config keys sent by the server
ROUND = "server-round"

# metric keys returned by devices
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
EPSILON_SAMPLE = "epsilon-sample"
DP_STEPS = "dp-steps"
SAMPLE_RATE = "sample-rate"
NOISE_MULTIPLIER = "noise-multiplier"
MAX_GRAD_NORM = "max-grad-norm"
EMPTY_STEPS = "empty-steps"
SECONDS = "seconds"
WER = "wer"
CER = "cer"
LOSS = "loss"
WORDS = "words"
CHARS = "chars"

# more config keys sent by the server
CLIP_NORM = "clip-norm"
NOISE_COHORT = "noise-cohort"
PLANNED_ROUNDS = "planned-rounds"
PARTICIPATION = "participation"

# more metric keys returned by devices
DECLINED = "declined"
CLIP_BIT = "clip-bit"

# the reply to the server's QUERY at the start of a run: the device's stable key (see server/devices.py)
DEVICE_KEY = "device-key"
