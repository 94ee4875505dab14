"""Small server-side pieces: the federated-evaluation sample, the stable device order, the checks
every reply passes (server/rounds.py) and the participation ledger."""

import json
import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fl.config import SamplePrivacyConfig, TrainConfig, UserPrivacyConfig
from fl.privacy.sample import SampleLevel
from fl.privacy.user import UserLevel
from fl.train import evaluation_devices
from server.devices import Devices
from server.ledger import ParticipationLedger
from server.rounds import MAX_EXAMPLES, Rejected, check_update, example_weight


def test_federated_evaluation_takes_all_devices_or_a_reproducible_sample_per_round():
    keys = list(range(100))
    assert evaluation_devices(keys, 0, seed=0, r=3) == keys and evaluation_devices(keys, 500, seed=0, r=3) == keys
    a = evaluation_devices(keys, 10, seed=0, r=3)
    assert len(a) == 10 == len(set(a)) and a == sorted(a) and set(a) <= set(keys)
    assert a == evaluation_devices(keys, 10, seed=0, r=3)  # the same run evaluates the same devices
    assert a != evaluation_devices(keys, 10, seed=0, r=4)  # and other devices the next time


def test_devices_are_ordered_by_key_whatever_their_node_ids():
    devices = Devices({7: 9001, 2: 5, 4: 123456789})
    assert devices.keys == [2, 4, 7]
    assert devices.nodes([2, 7]) == [5, 9001]
    assert devices.key_of(123456789) == 4


def test_the_simulation_speedups_match_the_installed_flower():
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

    from experiments import flower_speedups

    assert flower_speedups.poll_by_destination()  # False would mean flwr changed the method it replaces
    flower_speedups.apply()
    flower_speedups.apply()  # idempotent
    assert InMemoryLinkState.get_message_ins is flower_speedups._get_message_ins


# -- distrusting replies (server/rounds.py) ------------------------------------------------------------
REFERENCE = {"w": torch.zeros(2, 3), "b": torch.zeros(3), "steps": torch.tensor(4)}


def _reply(**over) -> ArrayRecord:
    update = {"w": torch.ones(2, 3), "b": torch.full((3,), 0.5)} | over
    return ArrayRecord({k: v for k, v in update.items() if v is not None})


def test_check_update_accepts_exactly_the_model_s_float_entries():
    out = check_update(_reply(), REFERENCE)
    assert set(out) == {"w", "b"} and torch.equal(out["w"], torch.ones(2, 3)) and out["b"].dtype == torch.float32


@pytest.mark.parametrize("arrays,match", [
    (_reply(w=torch.tensor([[1.0, float("nan"), 0], [0, 0, 0]])), "non-finite"),
    (_reply(b=torch.tensor([0.0, float("inf"), 0.0])), "non-finite"),
    (_reply(b=torch.tensor([0.0, -float("inf"), 0.0])), "non-finite"),
    (_reply(w=torch.ones(3, 2)), "shape"),
    (_reply(w=torch.ones(6)), "shape"),
    (_reply(w=torch.ones(2, 3, dtype=torch.float64)), "dtype"),
    (_reply(w=torch.ones(2, 3, dtype=torch.int32)), "dtype"),
    (_reply(b=None), "missing"),
    (_reply(extra=torch.zeros(1)), "extra"),
    (_reply(steps=torch.tensor(5)), "extra"),  # integer buffers are not part of an update
])
def test_check_update_rejects_malformed_updates(arrays, match):
    with pytest.raises(Rejected, match=match):
        check_update(arrays, REFERENCE)


def test_check_update_rejects_an_array_whose_bytes_do_not_match_its_shape():
    arrays = _reply()
    good = arrays["w"]
    arrays["w"] = Array(dtype=good.dtype, shape=good.shape, stype=good.stype, data=np.ones(2, np.float32).tobytes())
    with pytest.raises(Rejected):
        check_update(arrays, REFERENCE)


def test_check_update_rejects_an_unknown_dtype_string():
    arrays = _reply()
    good = arrays["w"]
    arrays["w"] = Array(dtype="bogus", shape=good.shape, stype=good.stype, data=good.data)
    with pytest.raises(Rejected, match="dtype"):
        check_update(arrays, REFERENCE)


def test_example_weight_is_a_sane_integer_count():
    assert example_weight({"num-examples": 12}) == 12.0
    assert example_weight({"num-examples": 3.0}) == 3.0 and example_weight({"num-examples": MAX_EXAMPLES})


@pytest.mark.parametrize("n", [0, -1, 1e12, math.nan, math.inf, 2.5, True, False, "3", None])
def test_example_weight_rejects_absurd_counts(n):
    with pytest.raises(Rejected, match="example count"):
        example_weight({"num-examples": n})


def test_example_weight_rejects_a_missing_count():
    with pytest.raises(Rejected, match="example count"):
        example_weight({})


# -- the participation ledger (server/ledger.py) -------------------------------------------------------
def test_the_ledger_charges_devices_and_reports_the_worst():
    ledger = ParticipationLedger()
    assert ledger.worst == 0 and ledger.rounds == 0
    ledger.charge([1, 2, 3])
    ledger.charge([2, 3])
    ledger.charge([3])
    ledger.charge([])  # a round nobody was charged in still bounds a device that could have been
    assert ledger.charged == {1: 1, 2: 2, 3: 3} and ledger.worst == 3 and ledger.rounds == 4


def test_the_ledger_state_round_trips_through_json_keys():
    ledger = ParticipationLedger()
    ledger.charge([7, 9, 9])
    again = ParticipationLedger()
    again.load_state_dict(json.loads(json.dumps(ledger.state_dict())))  # keys come back as strings
    assert again.charged == {7: 1, 9: 2} and again.worst == 2 and again.rounds == 1
    old = ParticipationLedger()
    old.load_state_dict({"charged": {"7": 3}})  # a state written before rounds were kept: the worst
    assert old.rounds == 3


def test_the_ledger_s_epsilons_are_those_of_a_device_in_every_round():
    """Published epsilons depend on the number of rounds alone, not on who the secret cohorts
    picked: device 2 was charged in 2 of 3 rounds, the figure is a device's in all 3."""
    ledger = ParticipationLedger()
    ledger.charge([1, 2])
    ledger.charge([2])
    ledger.charge([1])
    assert ledger.worst == 2
    sample = SampleLevel.from_config(SamplePrivacyConfig(noise_multiplier=1.0), TrainConfig(local_steps=4), 10)
    assert ledger.sample_epsilon(sample) == sample.epsilon(3) and ledger.sample_epsilon(sample, 1) == sample.epsilon(4)
    assert ledger.sample_epsilon(None) is None and ledger.user_server_epsilon(None) is None
    block = ledger.sample_block(sample, None)
    assert block["max_rounds"] == 3 and block["max_steps"] == 12
    assert "devices_charged" not in block  # a count no epsilon covers: private (private/summary-private.json)
    user = UserLevel(UserPrivacyConfig(noise="local", accountant="rdp"), devices=10, expected_cohort=2,
                     sampling="poisson", planned_rounds=5)
    assert ledger.user_server_epsilon(user) == user.server_facing_epsilon(3)
