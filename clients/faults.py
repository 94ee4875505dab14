"""Fault injection for simulations: devices that crash, lose their reply, or are slow.

Each decision is a draw seeded by (run seed, round, device), where the device is its simulation
``partition-id`` (its node id elsewhere), so a configured run fails the same way every time.
A crash before training spends nothing; a reply lost after training has already spent budget
(the ledger is written before replying), which is what the privacy report must still count.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from flwr.app import Context


class InjectedFault(RuntimeError):
    """An injected device failure (its message says which, and whether the device had trained)."""


@dataclass(frozen=True)
class Faults:
    """Probabilities, per device and round, of each injected fault; ``slow_seconds``: the delay."""

    crash_before_training: float = 0.0
    drop_after_training: float = 0.0
    slow_devices: float = 0.0
    slow_seconds: float = 0.0

    def _draw(self, context: Context, seed: int, server_round: int, what: str) -> float:
        device = context.node_config.get("partition-id", context.node_id)
        return random.Random(f"unheard-faults:{seed}:{server_round}:{device}:{what}").random()

    def before_training(self, context: Context, seed: int, server_round: int) -> None:
        """Sleep if this device is slow this round; raise if it crashes before training."""
        if self.slow_devices and self._draw(context, seed, server_round, "slow") < self.slow_devices:
            time.sleep(self.slow_seconds)
        if self.crash_before_training and self._draw(context, seed, server_round, "crash") < \
                self.crash_before_training:
            raise InjectedFault(f"injected fault: device {context.node_id} crashed before training "
                                f"in round {server_round} (nothing spent)")

    def after_training(self, context: Context, seed: int, server_round: int) -> None:
        """Raise if this device's reply is lost after it trained (its spend is already recorded)."""
        if self.drop_after_training and self._draw(context, seed, server_round, "drop") < self.drop_after_training:
            raise InjectedFault(f"injected fault: device {context.node_id} trained in round {server_round}, "
                                "reply lost")
