"""Simulated devices: the fleet file of this node's ``partition-id`` and a state folder beside it.

A simulated device's key is its partition id: the same device (data, state folder, seeds) in every
start of the simulation, whatever node id Flower gives it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context

from fl.data.fleet import DeviceData, load_device


@dataclass(frozen=True)
class SimulatedDevices:
    root: str

    def data(self, context: Context) -> DeviceData:
        return load_device(self.root, int(context.node_config["partition-id"]))

    def state(self, context: Context) -> Path:
        return state_dir(self.root, self.key(context))

    def key(self, context: Context) -> int:
        return int(context.node_config["partition-id"])


def state_dir(root: str, partition_id: int) -> Path:
    """The state folder (ledger, round history) of simulated device ``partition_id``."""
    return Path(root) / "state" / f"device-{partition_id:05d}"
