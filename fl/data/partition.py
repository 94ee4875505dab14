"""Who holds which recordings: utterances -> simulated devices, and each device's train/test split.

Schemes:

- ``"speaker"`` (the natural one, the default): a device is a speaker; the device id is the speaker id.
- ``"iid"``: utterances shuffled and dealt round-robin, so every device sees every speaker.
- ``"dirichlet"``: speaker-label skew. For each speaker, device shares are drawn from
  ``Dirichlet(alpha)`` and that speaker's utterances are split by them (as in the usual label-skew
  partitioner of Hsu et al. 2019); small ``alpha`` puts each speaker on few devices.

Everything is a function of the utterances (order-independent: they are sorted by id first) and the
seed, so the same config and seed give the same devices.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from fl.data.records import Utterance, group_by_speaker

log = logging.getLogger(__name__)

SCHEMES = ("speaker", "iid", "dirichlet")


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


def split_device(
    utterances: Sequence[Utterance], test_fraction: float, seed: int, min_test: int = 1
) -> tuple[list[Utterance], list[Utterance]]:
    """One device's data -> (train, test), each sorted by id; the same inputs give the same split.

    The test set holds ``round(test_fraction * n)`` utterances, at least ``min_test``, and never
    all of them: at least one utterance is always left for training.

    Raises:
        ValueError: ``test_fraction`` outside [0, 1), ``min_test`` < 0, or fewer than
            ``min_test + 1`` utterances.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    if min_test < 0:
        raise ValueError(f"min_test must be >= 0, got {min_test}")
    n = len(utterances)
    if n < min_test + 1:
        raise ValueError(
            f"a device with {n} utterance(s) cannot hold out min_test={min_test} for testing and "
            "keep one for training; lower min_test or give the device more data"
        )
    n_test = min(max(min_test, round(test_fraction * n)), n - 1)
    utts = sorted(utterances, key=lambda u: u.id)
    order = np.random.default_rng(seed).permutation(n)
    test_idx = set(order[:n_test].tolist())
    train = [u for i, u in enumerate(utts) if i not in test_idx]
    test = [u for i, u in enumerate(utts) if i in test_idx]
    return train, test
