"""Small server-side pieces: the federated-evaluation sample and the stable device order."""

from server.devices import Devices
from server.server_app import _evaluated


def test_federated_evaluation_takes_all_devices_or_a_reproducible_sample_per_round():
    keys = list(range(100))
    assert _evaluated(keys, 0, seed=0, r=3) == keys and _evaluated(keys, 500, seed=0, r=3) == keys
    a = _evaluated(keys, 10, seed=0, r=3)
    assert len(a) == 10 == len(set(a)) and a == sorted(a) and set(a) <= set(keys)
    assert a == _evaluated(keys, 10, seed=0, r=3)  # the same run evaluates the same devices
    assert a != _evaluated(keys, 10, seed=0, r=4)  # and other devices the next time


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
