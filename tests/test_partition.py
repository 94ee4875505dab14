"""Partitions into devices and per-device train/test splits."""

import random
from collections import Counter

import pytest

from fl.data.partition import partition, split_device
from fl.data.records import Utterance


def corpus(speakers: int = 10, per_speaker: int = 20) -> list[Utterance]:
    return [
        Utterance(f"s{s:02d}-{i:03d}", f"/x/s{s}/{i}.wav", "hello", f"s{s:02d}", 1.0)
        for s in range(speakers)
        for i in range(per_speaker)
    ]


def ids(devices: dict[str, list[Utterance]]) -> dict[str, list[str]]:
    return {d: [u.id for u in us] for d, us in devices.items()}


def test_speaker_scheme_is_one_device_per_speaker() -> None:
    utts = corpus()
    devices = partition(utts, "speaker", None, seed=0)
    assert sorted(devices) == [f"s{s:02d}" for s in range(10)]
    for dev, us in devices.items():
        assert len(us) == 20 and {u.speaker for u in us} == {dev}


def test_speaker_scheme_caps_devices_by_seed() -> None:
    utts = corpus()
    a = partition(utts, "speaker", 4, seed=1)
    assert len(a) == 4
    assert ids(a) == ids(partition(list(reversed(utts)), "speaker", 4, seed=1))
    picks = {tuple(partition(utts, "speaker", 4, seed=s)) for s in range(10)}
    assert len(picks) > 1  # the seed chooses which speakers


@pytest.mark.parametrize("scheme, n", [("speaker", None), ("iid", 7), ("dirichlet", 7), ("dirichlet", 40)])
def test_disjoint_complete_and_deterministic(scheme: str, n: int | None) -> None:
    utts = corpus()
    devices = partition(utts, scheme, n, seed=3, alpha=0.1)
    all_ids = [u.id for us in devices.values() for u in us]
    assert sorted(all_ids) == sorted(u.id for u in utts)  # every utterance, exactly once
    assert all(devices.values())  # no empty device
    if n is not None:
        assert len(devices) == n
    shuffled = utts[:]
    random.Random(0).shuffle(shuffled)
    assert ids(partition(shuffled, scheme, n, seed=3, alpha=0.1)) == ids(devices)
    if scheme != "speaker":
        assert ids(partition(utts, scheme, n, seed=4, alpha=0.1)) != ids(devices)


def test_iid_is_balanced_and_mixed() -> None:
    devices = partition(corpus(), "iid", 8, seed=0)
    assert sorted(len(us) for us in devices.values()) == [25] * 8
    assert all(len({u.speaker for u in us}) >= 5 for us in devices.values())


def top_speaker_share(alpha: float) -> float:
    """Mean over devices of the fraction of a device's utterances from its most common speaker."""
    devices = partition(corpus(speakers=20, per_speaker=30), "dirichlet", 10, seed=0, alpha=alpha)
    return sum(
        Counter(u.speaker for u in us).most_common(1)[0][1] / len(us) for us in devices.values()
    ) / len(devices)


def test_dirichlet_small_alpha_is_skewed() -> None:
    skewed, mixed = top_speaker_share(0.05), top_speaker_share(100.0)
    assert skewed > 0.4 and mixed < 0.15  # one speaker dominates vs ~1/20 each


def test_dirichlet_every_device_gets_data_even_when_tight() -> None:
    utts = corpus(speakers=2, per_speaker=5)
    devices = partition(utts, "dirichlet", 10, seed=0, alpha=0.01)
    assert sorted(len(us) for us in devices.values()) == [1] * 10


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(scheme="random", num_devices=2), "unknown partition scheme"),
        (dict(scheme="iid", num_devices=0), "at least 1"),
        (dict(scheme="iid", num_devices=None), "needs num_devices"),
        (dict(scheme="iid", num_devices=41), "more than the 40 utterances"),
        (dict(scheme="dirichlet", num_devices=41), "more than the 40 utterances"),
        (dict(scheme="speaker", num_devices=3), "more than the 2 speakers"),
        (dict(scheme="dirichlet", num_devices=2, alpha=0.0), "alpha"),
    ],
)
def test_partition_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        partition(corpus(speakers=2), seed=0, **kwargs)


def test_partition_rejects_empty_and_repeated_ids() -> None:
    with pytest.raises(ValueError, match="no utterances"):
        partition([], "speaker", None, seed=0)
    with pytest.raises(ValueError, match="unique"):
        partition(corpus(1, 3) * 2, "iid", 2, seed=0)


def test_split_device() -> None:
    utts = corpus(speakers=1, per_speaker=20)
    train, test = split_device(utts, 0.25, seed=0)
    assert (len(train), len(test)) == (15, 5)
    assert sorted(u.id for u in train + test) == [u.id for u in utts]
    assert split_device(list(reversed(utts)), 0.25, seed=0) == (train, test)
    assert split_device(utts, 0.25, seed=1) != (train, test)
    assert [len(t) for t in split_device(utts[:3], 0.1, seed=0)] == [2, 1]  # min_test
    assert [len(t) for t in split_device(utts[:2], 0.9, seed=0)] == [1, 1]  # one left to train
    assert [len(t) for t in split_device(utts[:1], 0.1, seed=0, min_test=0)] == [1, 0]


@pytest.mark.parametrize(
    "n, frac, min_test, match",
    [
        (1, 0.2, 1, "cannot hold out"),
        (5, 1.0, 1, "test_fraction"),
        (5, -0.1, 1, "test_fraction"),
        (5, 0.2, -1, "min_test"),
    ],
)
def test_split_device_rejects_bad_arguments(n: int, frac: float, min_test: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        split_device(corpus(1, n), frac, seed=0, min_test=min_test)
