"""No replay the server can difference (audit, issue 18, item A).

A device asked a request it already answered resends identical bits only where that reveals
nothing new: sample-level only, central and local user-level noise. Under distributed noise (each
device adds 1/t of the variance, SecAgg+ shows only sums) two attempts with different contributor
sets would let the server difference the sums down to one device's update with noise z C / sqrt(t):
there a repeat takes fresh noise and is charged again. And a request names its run (the server's
run nonce), so another run from the same seed model never gets the same bits.
"""

from __future__ import annotations

import math
from typing import Optional

import pytest
import torch
from flwr.app import Context, Message

from clients.client_app import DeviceSettings, _train
from clients.state import DeviceState
from fl import protocol as P
from fl.config import DevicePolicy, SamplePrivacyConfig, TrainConfig, UserPrivacyConfig
from fl.model.conformer import ConformerRecognizer
from fl.privacy.sample import SampleLevel
from fl.privacy.user import UserLevel, UserRound
from tests.conftest import TINY, OneDevice, fake_examples, train_message


def _message(config: dict, server_round: int = 1, nonce: str = "run-a") -> tuple[Message, Context]:
    return train_message(server_round, config, nonce=nonce)

MECHANISM = SampleLevel(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.3, steps=2)
COHORT = {None: None, "central": 0, "local": 1, "distributed": 3}


def _setup(noise: Optional[str], sample: bool = True, z: float = 2.0, clip: float = 0.5
           ) -> tuple[DeviceSettings, dict]:
    """A device under ``noise`` (None: no user-level DP) with the default (deployed) policy, and the config sent."""
    user = UserPrivacyConfig(noise=noise) if noise else None
    settings = DeviceSettings(TINY, TrainConfig(local_steps=2, batch_size=4), SamplePrivacyConfig() if sample else None,
                              user, seed=0, policy=DevicePolicy(allowed_user_noise=["central", "local", "distributed"]))
    config = (MECHANISM.to_config() if sample else {}) | (
        UserRound(z, clip, COHORT[noise]).to_config() if noise else {})
    return settings, config


def _reply(settings: DeviceSettings, store: OneDevice, config: dict, **kw) -> tuple[dict, dict]:
    reply = _train(settings, *_message(config, **kw), store, ConformerRecognizer(TINY))
    assert P.ARRAYS in reply.content, dict(reply.content[P.METRICS])
    return reply.content[P.ARRAYS].to_torch_state_dict(), dict(reply.content[P.METRICS])


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def _disjoint(a: dict, b: dict) -> bool:
    """No coordinate of the two updates is equal: they share no bits of noise."""
    return not any(bool((a[k] == b[k]).any()) for k in a if a[k].numel())


def test_a_repeated_distributed_request_is_answered_with_fresh_bits_and_charged_twice(tmp_path):
    settings, config = _setup("distributed")
    store = OneDevice(tmp_path, fake_examples(12))
    first, m1 = _reply(settings, store, config)
    again, m2 = _reply(settings, store, config)  # the same request: same round, model and run nonce
    assert m1 == m2 and _disjoint(first, again)  # same echo, fresh noise on every coordinate
    state = DeviceState(tmp_path)
    assert state.account("rdp").steps == 2 * MECHANISM.steps  # the sample-level ledger counts 2 releases
    assert state.server_account().history == [(2.0, 3), (2.0, 3)]  # ... and so does the server-facing one
    assert [r["release"] for r in state.rounds()] == [0, 1] and state.release().index == 1
    assert not state.release().replayable
    status = state.status()
    assert status["server_releases"] == 2
    assert status["server_epsilon"] == pytest.approx(
        UserLevel(UserPrivacyConfig(noise="distributed", noise_multiplier=2.0, delta=1e-5), 10, 3, "fixed", 2)
        .server_facing_epsilon(2))


@pytest.mark.parametrize("noise", [None, "central", "local"])
def test_a_repeated_request_without_split_noise_replays_identical_bits_and_counts_once(tmp_path, noise):
    settings, config = _setup(noise)
    store = OneDevice(tmp_path, fake_examples(12))
    first, m1 = _reply(settings, store, config)
    again, m2 = _reply(settings, store, config)
    assert _same(first, again) and m1 == m2  # identical bits reveal nothing new ...
    state = DeviceState(tmp_path)
    assert state.account("rdp").steps == MECHANISM.steps  # ... so the request counts once
    assert len(state.server_account().history) == (0 if noise is None else 1)
    assert state.rounds_trained() == [1] and state.release().index == 0


@pytest.mark.parametrize("noise", [None, "local", "distributed"])
def test_two_runs_from_the_same_seed_model_never_share_bits(tmp_path, noise):
    """Round 1 of two runs from the same seed model: the same request but for the run nonce."""
    settings, config = _setup(noise)
    store = OneDevice(tmp_path, fake_examples(12))
    one, _ = _reply(settings, store, config, nonce="a" * 32)
    two, _ = _reply(settings, store, config, nonce="b" * 32)
    noised = [k for k in one if not torch.equal(one[k], torch.zeros_like(one[k]))]
    assert noised and not any(torch.equal(one[k], two[k]) for k in noised)
    state = DeviceState(tmp_path)
    assert state.account("rdp").steps == 2 * MECHANISM.steps and state.release().index == 1
    assert [r["round_key"].split(":")[1] for r in state.rounds()] == ["a" * 32, "b" * 32]


def test_the_difference_attack_on_two_secure_sums_meets_the_full_noise(tmp_path):
    """The server's attack: it asks a round twice (a resume), SecAgg+ decodes the sum of devices A, B,
    C, D the first time and of A, B, C the second (D dropped out), and it subtracts. With replayed
    shares the difference would be D's update plus D's share alone, noise z C / sqrt(t); with the
    fresh shares the device code now sends, every share of both sums is in it: z C sqrt(2 + 1/t) >= z C.
    The sums are built from the very replies the project's device code sends (the clear update each
    device hands to SecAgg+'s masking)."""
    z, clip, t = 2.0, 0.5, 3
    settings, config = _setup("distributed", sample=False, z=z, clip=clip)
    stores = {name: OneDevice(tmp_path / name, fake_examples(8, seed=i), key_=i) for i, name in enumerate("ABCD")}

    def attempt(names: str) -> dict[str, dict]:
        return {n: _reply(settings, stores[n], config, server_round=4, nonce="c" * 32)[0] for n in names}

    first, second = attempt("ABCD"), attempt("ABC")
    keys = list(first["A"])
    numel = sum(first["A"][k].numel() for k in keys)
    assert numel >= 20_000

    def flat_sum(replies: list[dict]) -> torch.Tensor:
        return torch.cat([sum(r[k].double() for r in replies).flatten() for k in keys])

    difference = flat_sum(list(first.values())) - flat_sum(list(second.values()))
    replayed = flat_sum(list(first.values())) - flat_sum([first[n] for n in "ABC"])  # what the old code allowed
    # D's clipped update has norm <= C: it moves the empirical std over the coordinates by at most C / sqrt(n)
    slack = clip / math.sqrt(numel)
    fresh_std, replay_std = z * clip * math.sqrt(2 + 1 / t), z * clip / math.sqrt(t)
    assert float(difference.std()) == pytest.approx(fresh_std, rel=0.03, abs=slack)
    assert float(difference.std()) >= z * clip and float(difference.std()) > 2.5 * replay_std
    assert float(replayed.std()) == pytest.approx(replay_std, rel=0.03, abs=slack)  # the attack has its power
    for name, releases in (("A", 2), ("B", 2), ("C", 2), ("D", 1)):  # and every attempt is on each ledger
        assert len(DeviceState(tmp_path / name).server_account().history) == releases
