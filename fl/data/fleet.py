"""A simulated fleet on disk: one file of featurised examples per device.

The experiment runner writes it once; each simulated device (a Flower ClientApp instance with a
``partition-id``) loads only its own file, exactly as a real device only reads its own folder.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Mapping

import torch

from fl.data.features import Example

log = logging.getLogger(__name__)

INDEX = "fleet.json"


@dataclass(frozen=True)
class DeviceData:
    """What one device holds: its own training and local test utterances."""

    device_id: str
    train: list[Example]
    test: list[Example]


def write_fleet(devices: Mapping[str, DeviceData], root: Path) -> list[str]:
    """Write each device to ``root/device-NNNNN.pt`` and an index; returns device ids by partition id."""
    root.mkdir(parents=True, exist_ok=True)
    ids = list(devices)
    for pid, device_id in enumerate(ids):
        d = devices[device_id]
        torch.save({"device_id": d.device_id, "train": d.train, "test": d.test}, root / f"device-{pid:05d}.pt")
    (root / INDEX).write_text(json.dumps({"devices": ids}, indent=1))
    log.info("wrote a fleet of %d devices to %s", len(ids), root)
    return ids


@lru_cache(maxsize=64)
def load_device(root: str, partition_id: int) -> DeviceData:
    """Load (and keep in this process' memory) the data of the device with ``partition_id``."""
    path = Path(root) / f"device-{int(partition_id):05d}.pt"
    if not path.exists():
        raise FileNotFoundError(f"no data for simulated device {partition_id} at {path}")
    blob = torch.load(path, weights_only=False)
    return DeviceData(blob["device_id"], blob["train"], blob["test"])
