"""Device data for simulated devices: the fleet file of this node's ``partition-id``."""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import Context

from fl.data.fleet import DeviceData, load_device


@dataclass(frozen=True)
class SimulatedDevices:
    root: str

    def __call__(self, context: Context) -> DeviceData:
        return load_device(self.root, int(context.node_config["partition-id"]))
