"""A device's state folder: its secret, its DP-SGD ledger, its releases and replays, its round history."""

import json
import stat

import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord

import clients.state as state_module
from clients.state import DeviceState, Release, reply_digest, round_key
from fl.privacy.randomness import Secret
from fl.privacy.sample import SampleAccount


def _global(value: float = 0.0) -> ArrayRecord:
    return ArrayRecord({"w": torch.full((2, 3), value), "b": torch.zeros(3)})


def test_ledger_round_trips_through_a_fresh_view_of_the_folder(tmp_path):
    assert DeviceState(tmp_path).account("rdp").history == []
    acc = SampleAccount(history=[(0.8, 0.25, 8), (0.8, 0.25, 8)], accountant="rdp")
    DeviceState(tmp_path).commit(Release("1:x", "d", None, 0), acc, 1, 8, 12, 0.5)
    again = DeviceState(tmp_path).account("rdp")
    assert again.history == acc.history and again.epsilon(1e-5) == acc.epsilon(1e-5)
    assert DeviceState(tmp_path).account("prv").accountant == "prv"


def test_the_secret_is_a_private_32_byte_file_kept_across_instances_and_unique_per_device(tmp_path):
    a = DeviceState(tmp_path / "a")
    secret = a.secret()
    path = tmp_path / "a" / state_module.SECRET
    assert path.read_bytes() == secret.key and len(secret.key) == 32 and not secret.reproducible
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o700
    assert DeviceState(tmp_path / "a").secret() == secret
    assert DeviceState(tmp_path / "b").secret().key != secret.key


def test_a_reproducible_secret_is_derived_from_the_seed_and_writes_no_file(tmp_path):
    s = DeviceState(tmp_path, reproducible=(7, 42)).secret()
    assert s == Secret.from_seed(7, "device:42") and s.reproducible
    assert s != Secret.from_seed(7, "device:43") and s != Secret.from_seed(8, "device:42")
    assert not (tmp_path / state_module.SECRET).exists()


def test_plan_gives_a_new_round_the_next_index_and_replays_a_repeated_round(tmp_path):
    dev = DeviceState(tmp_path)
    first = round_key(1, _global())
    plan = dev.plan(first)
    assert (plan.index, plan.history, plan.replaying) == (0, None, None)
    before = [(1.0, 0.25, 8)]
    release = Release(first, "digest-1", before, plan.index)
    dev.commit(release, SampleAccount(history=[*before, (1.0, 0.25, 8)]), 1, 8, 12, 1.0)
    again = dev.plan(first)  # the same round asked again (a resumed server)
    assert again.index == 0 and again.history == before and again.replaying == release
    nxt = dev.plan(round_key(2, _global(0.5)))
    assert (nxt.index, nxt.history, nxt.replaying) == (1, None, None)
    assert dev.plan(round_key(1, _global(0.5))).index == 1  # same number, other model: a new round


def test_round_key_and_reply_digest_name_their_contents():
    assert round_key(3, _global()) == round_key(3, _global()) != round_key(4, _global())
    assert round_key(3, _global()) != round_key(3, _global(1.0))
    metrics = MetricRecord({"sample-z": 1.0})
    assert reply_digest(_global(), metrics) == reply_digest(_global(), MetricRecord({"sample-z": 1.0}))
    assert reply_digest(_global(), metrics) != reply_digest(_global(), MetricRecord({"sample-z": 2.0}))
    assert reply_digest(_global(), metrics) != reply_digest(_global(1.0), metrics)


def test_a_replayed_commit_is_recorded_once_in_the_round_history(tmp_path):
    dev = DeviceState(tmp_path)
    release = Release(round_key(1, _global()), "d", [], 0)
    dev.commit(release, SampleAccount(history=[(1.0, 0.25, 8)]), 1, 8, 12, 0.25)
    dev.commit(release, SampleAccount(history=[(1.0, 0.25, 8)]), 1, 8, 12, 0.25)
    assert dev.rounds_trained() == [1]
    dev.commit(Release(round_key(2, _global(1.0)), "e", [(1.0, 0.25, 8)], 1), None, 2, 8, 12, 0.5)
    assert dev.rounds_trained() == [1, 2]
    assert dev.rounds()[0] == {"round": 1, "round_key": release.round_key, "release": 0, "steps": 8,
                               "utterances": 12, "seconds": 0.25}
    assert dev.account("rdp").history == [(1.0, 0.25, 8)]  # no account (no sample DP): ledger untouched


def _crash_before_the_ledger(dev: DeviceState, monkeypatch) -> tuple[Release, SampleAccount, SampleAccount, int]:
    """Round 1 committed; round 2's commit dies after the release record, before the ledger."""
    before = SampleAccount(history=[(1.0, 0.25, 8)])
    dev.commit(Release(round_key(1, _global()), "d1", [], 0), before, 1, 8, 12, 0.1)
    key2 = round_key(2, _global(1.0))
    release = Release(key2, "d2", before.history, dev.plan(key2).index)
    after = before.plus(1.0, 0.25, 8)
    real_write = state_module._write_atomic

    def crash_on_ledger(path, text):
        if path.name == state_module.LEDGER:
            raise OSError("power cut")
        real_write(path, text)

    with monkeypatch.context() as mp:
        mp.setattr(state_module, "_write_atomic", crash_on_ledger)
        with pytest.raises(OSError):
            dev.commit(release, after, 2, 8, 12, 0.1)
    return release, before, after, release.index


def test_a_crash_after_the_release_record_replays_from_the_ledger_before_and_counts_once(tmp_path, monkeypatch):
    dev = DeviceState(tmp_path)
    release, before, after, index = _crash_before_the_ledger(dev, monkeypatch)
    assert dev.release() == release  # written first: the reply that never left is on record
    assert dev.account("rdp").history == before.history and dev.rounds_trained() == [1]
    replay = dev.plan(release.round_key)  # asked again: same index, trained from the recorded ledger-before
    assert replay.index == index == 1 and replay.history == before.history and replay.replaying == release
    dev.commit(release, after, 2, 8, 12, 0.1)
    dev.commit(release, after, 2, 8, 12, 0.1)
    assert dev.account("rdp").history == after.history  # the round counted once in the ledger


def test_a_round_replayed_after_a_crash_still_appears_in_the_round_history(tmp_path, monkeypatch):
    dev = DeviceState(tmp_path)
    release, _, after, _ = _crash_before_the_ledger(dev, monkeypatch)
    dev.commit(release, after, 2, 8, 12, 0.1)
    assert dev.rounds_trained() == [1, 2]


def test_the_device_key_is_drawn_once_and_kept(tmp_path):
    key = DeviceState(tmp_path / "dev").key()
    assert 0 <= key < 2**52 and float(key) == key
    assert DeviceState(tmp_path / "dev").key() == key
    assert stat.S_IMODE((tmp_path / "dev" / state_module.KEY).stat().st_mode) == 0o600


def test_declining_leaves_the_owner_a_status_note(tmp_path):
    dev = DeviceState(tmp_path)
    assert dev.rounds() == [] and dev.release() is None
    dev.declined(5, "budget", epsilon=9.5, max_epsilon=10.0)
    note = json.loads((tmp_path / state_module.STATUS).read_text())
    assert note == {"declined_round": 5, "reason": "budget", "epsilon": 9.5, "max_epsilon": 10.0}
