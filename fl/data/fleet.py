"""A simulated fleet on disk: one file of featurised examples per device.

The experiment runner writes it once; each simulated device (a Flower ClientApp instance with a
``partition-id``) loads only its own file, exactly as a real device only reads its own folder.
Files are memory-mapped, not read: a device whose round draws nothing never touches its features,
the pages a round does read are the OS page cache's, shared by every actor process, and a
simulation actor keeps the devices it has served without holding their features in its own memory.
Each file is written beside its place and renamed into it, so a mapping never sees a file change.
"""

from __future__ import annotations

import json
import logging
import os
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
        path = root / f"device-{pid:05d}.pt"
        part = path.with_name(path.name + ".part")
        torch.save({"device_id": d.device_id, "train": d.train, "test": d.test}, part)
        os.replace(part, path)  # a new file: a process that mapped the old one keeps reading the old one
    (root / INDEX).write_text(json.dumps({"devices": ids}, indent=1))
    load_device.cache_clear()  # this process reads the new files from now on
    log.info("wrote a fleet of %d devices to %s", len(ids), root)
    return ids


@lru_cache(maxsize=1024)
def load_device(root: str, partition_id: int) -> DeviceData:
    """The data of the device with ``partition_id``, memory-mapped (its features are read when a
    batch uses them) and kept for this process' later messages: a kept device costs its examples'
    metadata, its features stay in the page cache."""
    path = Path(root) / f"device-{int(partition_id):05d}.pt"
    if not path.exists():
        raise FileNotFoundError(f"no data for simulated device {partition_id} at {path}")
    blob = torch.load(path, weights_only=False, mmap=True)
    return DeviceData(blob["device_id"], blob["train"], blob["test"])
