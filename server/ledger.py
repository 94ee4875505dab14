"""The server's view of sample-level privacy: each device's latest self-reported cumulative spend.

Devices report their cumulative epsilon in every train *and* evaluate reply, so a device whose
training reply was lost is caught up at the next evaluation. A device that was sent training but
has not reported since is listed as unconfirmed: its spend may be higher than the server knows.
Devices are named by their stable keys (``server/devices.py``), so the ledger survives a resume.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

from fl import protocol as P
from server.rounds import Replies


class SampleLedger:
    def __init__(self, delta: Optional[float], accountant: Optional[str]) -> None:
        self.delta = delta
        self.accountant = accountant
        self.by_device: dict[int, dict[str, float]] = {}
        self.unconfirmed: set[int] = set()

    def sent_training(self, devices: list[int]) -> None:
        self.unconfirmed |= set(devices)

    def update(self, replies: Replies, key_of: Callable[[int], int]) -> None:
        for m in replies.ok:
            self.report(key_of(m.metadata.src_node_id), m.content[P.METRICS])

    def report(self, device: int, metrics: Mapping[str, Any]) -> None:
        """Take one device's reported figures (from any kind of reply)."""
        if P.EPSILON_SAMPLE in metrics:
            self.by_device[device] = {k: float(v) for k, v in metrics.items()}
            self.unconfirmed.discard(device)

    def state_dict(self) -> dict[str, Any]:
        return {"by_device": self.by_device, "unconfirmed": sorted(self.unconfirmed)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.by_device = {int(k): dict(v) for k, v in state["by_device"].items()}
        self.unconfirmed = set(state["unconfirmed"])

    @property
    def epsilon(self) -> Optional[float]:
        if self.delta is None or not self.by_device:
            return None
        return max(r[P.EPSILON_SAMPLE] for r in self.by_device.values())

    def block(self) -> Optional[dict[str, Any]]:
        """The summary's ``privacy.sample``: the figures of the device with the largest epsilon."""
        if not self.by_device:
            return None
        worst = max(self.by_device.values(), key=lambda r: r[P.EPSILON_SAMPLE])
        return {
            "noise_multiplier": worst[P.NOISE_MULTIPLIER], "max_grad_norm": worst[P.MAX_GRAD_NORM],
            "sample_rate": worst[P.SAMPLE_RATE], "max_steps": int(worst[P.DP_STEPS]),
            "epsilon": worst[P.EPSILON_SAMPLE], "delta": self.delta, "accountant": self.accountant,
            "devices_unconfirmed": len(self.unconfirmed),
        }
