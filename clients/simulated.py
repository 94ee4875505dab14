"""Simulated devices: the fleet file of this node's ``partition-id`` and a ledger file beside it."""

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

    def ledger(self, context: Context) -> Path:
        return Path(self.root) / "ledgers" / f"device-{int(context.node_config['partition-id']):05d}.json"
