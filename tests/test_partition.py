"""Partitions into devices and per-device train/test splits."""

import hashlib
import hmac
import math
import random
from collections import Counter

import pytest

from clients.local import split_local
from clients.state import DeviceState
from fl.data.partition import partition, split_device, split_key
from fl.data.records import Utterance
from fl.privacy.randomness import SPLIT


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


KEY = split_key(0, "s00")


def sides(train: list[Utterance], test: list[Utterance]) -> dict[str, str]:
    return {u.id: "train" for u in train} | {u.id: "test" for u in test}


def test_split_device() -> None:
    utts = corpus(speakers=1, per_speaker=20)
    train, test = split_device(utts, 0.25, KEY)
    assert sorted(u.id for u in train + test) == [u.id for u in utts]
    assert train == sorted(train, key=lambda u: u.id) and test == sorted(test, key=lambda u: u.id)
    assert train and test
    assert split_device(list(reversed(utts)), 0.25, KEY) == (train, test)
    assert split_device(utts, 0.25, split_key(0, "s00")) == (train, test)  # reproducible from seed and device
    assert split_device(utts, 0.0, KEY) == (utts, [])
    assert split_device([], 0.25, KEY) == ([], [])


def test_the_rule_is_the_documented_hmac() -> None:
    utts = corpus(speakers=1, per_speaker=50)
    expected = {
        u.id for u in utts
        if int.from_bytes(hmac.new(KEY, u.id.encode(), hashlib.sha256).digest()[:8], "big") / 2**64 < 0.3
    }
    assert {u.id for u in split_device(utts, 0.3, KEY)[1]} == expected
    assert split_key(3, "device-007") == hashlib.sha256(b"unheard-split:3:device-007").digest()


def test_adding_or_removing_a_recording_moves_no_other() -> None:
    utts = corpus(speakers=1, per_speaker=31)
    base, extra = utts[:30], utts[30]
    before = sides(*split_device(base, 0.25, KEY))
    assert set(before.values()) == {"train", "test"}  # both sides populated: the check below means something
    after = sides(*split_device(base + [extra], 0.25, KEY))
    assert set(after) == set(before) | {extra.id}
    assert {i: after[i] for i in before} == before  # no recording already there changed side
    for gone in base:  # removing any one of them moves no other either
        rest = sides(*split_device([u for u in base if u is not gone], 0.25, KEY))
        assert rest == {i: side for i, side in before.items() if i != gone.id}


def test_the_test_fraction_holds_on_average() -> None:
    utts = corpus(speakers=1, per_speaker=2000)
    n_test = len(split_device(utts, 0.2, KEY)[1])
    # Binomial(2000, 0.2): mean 400, sd 17.9; the key is pinned, so this is deterministic
    assert abs(n_test - 400) <= 4 * math.sqrt(2000 * 0.2 * 0.8)
    for frac in (0.05, 0.5, 0.9):
        k = len(split_device(utts, frac, KEY)[1])
        assert abs(k - 2000 * frac) <= 4 * math.sqrt(2000 * frac * (1 - frac))
    # a larger fraction only adds to the test side: the same recordings stay test
    small, large = ({u.id for u in split_device(utts, f, KEY)[1]} for f in (0.1, 0.3))
    assert small < large


def test_different_keys_give_different_splits() -> None:
    utts = corpus(speakers=1, per_speaker=30)
    splits = {
        tuple(u.id for u in split_device(utts, 0.25, key)[1])
        for key in (KEY, split_key(1, "s00"), split_key(0, "s01"), bytes(32), b"\x01" * 32)
    }
    assert len(splits) == 5


def test_a_small_device_may_get_no_test_or_no_training_recordings() -> None:
    utts = corpus(speakers=1, per_speaker=200)
    points = {u.id: len(split_device([u], 0.5, KEY)[1]) for u in utts}
    assert set(points.values()) == {0, 1}  # one recording: no count adjustment either way
    only_test = [u for u in utts if points[u.id]][:2]
    assert split_device(only_test, 0.5, KEY) == ([], only_test)


@pytest.mark.parametrize(
    "frac, key, error, match",
    [
        (1.0, KEY, ValueError, "test_fraction"),
        (-0.1, KEY, ValueError, "test_fraction"),
        (0.2, 0, TypeError, "bytes"),
        (0.2, "secret-key-of-some-length", TypeError, "bytes"),
        (0.2, b"short", ValueError, "16 bytes"),
    ],
)
def test_split_device_rejects_bad_arguments(frac: float, key: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        split_device(corpus(1, 5), frac, key)  # type: ignore[arg-type]


def test_a_deployed_device_keys_its_split_with_its_own_secret(tmp_path) -> None:
    utts = corpus(speakers=1, per_speaker=40)
    first = split_local(utts, tmp_path / "a", 0.25)
    other = split_local(utts, tmp_path / "b", 0.25)
    assert first != other  # two devices (two secrets) split the same ids differently
    assert split_local(utts, tmp_path / "a", 0.25) == first  # the same folder, reloaded, splits the same way
    secret = DeviceState(tmp_path / "a").secret()
    assert first == split_device(utts, 0.25, secret.stream_key(SPLIT))
    assert first != split_device(utts, 0.25, split_key(0, "a"))  # not the public simulation key
    # the rule is the same: one more recording on the device moves none of the others
    more = split_local(utts + corpus(speakers=2, per_speaker=1)[1:], tmp_path / "a", 0.25)
    assert {i: side for i, side in sides(*more).items() if i in sides(*first)} == sides(*first)
