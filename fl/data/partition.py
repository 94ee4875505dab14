"""Who holds which recordings: utterances -> simulated devices, and each device's train/test split.

Schemes:

- ``"speaker"`` (the natural one, the default): a device is a speaker; the device id is the speaker id.
- ``"iid"``: utterances shuffled and dealt round-robin, so every device sees every speaker.
- ``"dirichlet"``: speaker-label skew. For each speaker, device shares are drawn from
  ``Dirichlet(alpha)`` and that speaker's utterances are split by them (as in the usual label-skew
  partitioner of Hsu et al. 2019); small ``alpha`` puts each speaker on few devices.

Everything is a function of the utterances (order-independent: they are sorted by id first) and the
seed, so the same config and seed give the same devices.

A device's train/test split (:func:`split_device`) is decided per recording by a keyed hash of its
id, so adding or removing a recording never moves another. The key is :func:`split_key` of the seed
and device id in simulation, and a deployed device's own secret on the device.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Sequence

import numpy as np

from fl.data.records import Utterance, group_by_speaker

log = logging.getLogger(__name__)

SCHEMES = ("speaker", "iid", "dirichlet")
_MIN_KEY_BYTES = 16  # a split key shorter than this is a mistake (both real keys are 32 bytes)


def partition(
    utterances: Sequence[Utterance],
    scheme: str,
    num_devices: int | None,
    seed: int,
    alpha: float = 0.5,
) -> dict[str, list[Utterance]]:
    """Split ``utterances`` into devices: device id -> its utterances (sorted by id).

    ``num_devices`` is required for "iid" and "dirichlet"; for "speaker" it caps the number of
    speakers taken (chosen at random by ``seed``), and ``None`` takes all. Every device returned
    holds at least one utterance, and no utterance is on two devices.

    Raises:
        ValueError: unknown scheme, no utterances, repeated ids, ``num_devices`` missing or < 1,
            more devices than speakers ("speaker") or utterances ("iid", "dirichlet"), ``alpha`` <= 0.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown partition scheme {scheme!r}; expected one of {SCHEMES}")
    if not utterances:
        raise ValueError("no utterances to partition")
    if num_devices is not None and num_devices < 1:
        raise ValueError(f"num_devices must be at least 1, got {num_devices}")
    if num_devices is None and scheme != "speaker":
        raise ValueError(f"the {scheme!r} scheme needs num_devices")
    utts = sorted(utterances, key=lambda u: u.id)
    duplicates = sorted({a.id for a, b in zip(utts, utts[1:]) if a.id == b.id})
    if duplicates:
        raise ValueError(f"utterance ids must be unique; repeated: {duplicates[:5]}")
    rng = np.random.default_rng(seed)
    if scheme == "speaker":
        devices = _by_speaker(utts, num_devices, rng)
    else:
        assert num_devices is not None
        if num_devices > len(utts):
            raise ValueError(
                f"num_devices={num_devices} is more than the {len(utts)} utterances to share out"
            )
        if scheme == "iid":
            devices = _iid(utts, num_devices, rng)
        else:
            if not alpha > 0:
                raise ValueError(f"alpha must be positive, got {alpha}")
            devices = _dirichlet(utts, num_devices, alpha, rng)
    sizes = [len(v) for v in devices.values()]
    log.info(
        "partitioned %d utterances into %d devices (%s, seed %d): %d to %d utterances a device",
        len(utts), len(devices), scheme, seed, min(sizes), max(sizes),
    )
    return devices


def _device_ids(n: int) -> list[str]:
    width = max(3, len(str(n - 1)))
    return [f"device-{i:0{width}d}" for i in range(n)]


def _by_speaker(
    utts: list[Utterance], num_devices: int | None, rng: np.random.Generator
) -> dict[str, list[Utterance]]:
    by_speaker = group_by_speaker(utts)
    speakers = list(by_speaker)
    if num_devices is not None:
        if num_devices > len(speakers):
            raise ValueError(
                f"num_devices={num_devices} is more than the {len(speakers)} speakers; "
                "use num_devices=null to take every speaker"
            )
        picked = rng.choice(len(speakers), size=num_devices, replace=False)
        speakers = [speakers[i] for i in sorted(picked)]
    return {s: by_speaker[s] for s in speakers}


def _iid(
    utts: list[Utterance], num_devices: int, rng: np.random.Generator
) -> dict[str, list[Utterance]]:
    order = rng.permutation(len(utts))
    return {
        dev: sorted((utts[i] for i in order[k::num_devices]), key=lambda u: u.id)
        for k, dev in enumerate(_device_ids(num_devices))
    }


def _dirichlet(
    utts: list[Utterance], num_devices: int, alpha: float, rng: np.random.Generator
) -> dict[str, list[Utterance]]:
    """Label-skew split by speaker; devices left empty each take one utterance from the largest."""
    buckets: list[list[Utterance]] = [[] for _ in range(num_devices)]
    for speaker_utts in group_by_speaker(utts).values():
        shares = rng.dirichlet(np.full(num_devices, alpha))
        shuffled = [speaker_utts[i] for i in rng.permutation(len(speaker_utts))]
        cuts = (np.cumsum(shares)[:-1] * len(shuffled)).astype(int)
        for bucket, part in zip(buckets, np.split(np.arange(len(shuffled)), cuts)):
            bucket.extend(shuffled[i] for i in part)
    for bucket in buckets:
        if not bucket:
            largest = max(buckets, key=len)
            bucket.append(largest.pop())
    ids = _device_ids(num_devices)
    return {dev: sorted(bucket, key=lambda u: u.id) for dev, bucket in zip(ids, buckets)}


def split_key(seed: int, device: str) -> bytes:
    """The key of a *simulated* device's train/test split: SHA-256 of the config seed and device id.

    In simulation the split is data preparation, not DP randomness, so it is public and reproducible
    from the config (the same seed and device give the same split). A deployed device keys its split
    with its own secret instead (``clients/local.py``), so nobody else can choose or predict which of
    its recordings are test.
    """
    return hashlib.sha256(f"unheard-split:{seed}:{device}".encode()).digest()


def split_device(
    utterances: Sequence[Utterance], test_fraction: float, key: bytes
) -> tuple[list[Utterance], list[Utterance]]:
    """One device's data -> (train, test), each sorted by id: one independent rule per recording.

    A recording is test iff the first 8 bytes of HMAC-SHA256(``key``, its id as UTF-8), read as a
    big-endian integer over 2**64, are below ``test_fraction``. Guarantee: which side a recording
    falls on is a function of its id and the key only, so adding or removing one recording never
    moves another (the per-recording DP guarantee stays per recording, not a group bound). Each
    recording is test with probability ``test_fraction`` over keys, independently of the others; no
    count is adjusted afterwards (that would couple recordings again), so a device may get no test
    recordings, or, with few recordings, no training ones (callers treat that as a device with no
    usable training recordings).

    ``key``: :func:`split_key` in simulation; a deployed device's secret-derived key
    (``Secret.stream_key(SPLIT)``).

    Raises:
        TypeError: ``key`` is not ``bytes``.
        ValueError: ``test_fraction`` outside [0, 1), or ``key`` shorter than 16 bytes.
    """
    if not isinstance(key, bytes):
        raise TypeError(f"the split key must be bytes, got {type(key).__name__}")
    if len(key) < _MIN_KEY_BYTES:
        raise ValueError(f"the split key must be at least {_MIN_KEY_BYTES} bytes, got {len(key)}")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    train: list[Utterance] = []
    test: list[Utterance] = []
    for u in sorted(utterances, key=lambda u: u.id):
        (test if _split_point(key, u.id) < test_fraction else train).append(u)
    return train, test


def _split_point(key: bytes, utterance_id: str) -> float:
    """HMAC-SHA256(key, id)'s first 8 bytes as a number in [0, 1): where the recording falls."""
    digest = hmac.new(key, utterance_id.encode("utf-8"), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") / 2**64
