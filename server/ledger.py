"""The server's view of sample-level privacy: each device's latest self-reported cumulative spend.

Devices report their cumulative epsilon in every train *and* evaluate reply, so a device whose
training reply was lost is caught up at the next evaluation. A device that was sent training but
has not reported since is listed as unconfirmed: its spend may be higher than the server knows.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from fl import protocol as P
from server.rounds import Replies


class SampleLedger:
    def __init__(self, delta: Optional[float], accountant: Optional[str]) -> None:
        self.delta = delta
        self.accountant = accountant
        self.by_node: dict[int, dict[str, float]] = {}
        self.unconfirmed: set[int] = set()

    def sent_training(self, nodes: list[int]) -> None:
        self.unconfirmed |= set(nodes)

    def update(self, replies: Replies) -> None:
        for m in replies.ok:
            self.report(m.metadata.src_node_id, m.content[P.METRICS])

    def report(self, node: int, metrics: Mapping[str, Any]) -> None:
        """Take one device's reported figures (from any kind of reply)."""
        if P.EPSILON_SAMPLE in metrics:
            self.by_node[node] = {k: float(v) for k, v in metrics.items()}
            self.unconfirmed.discard(node)

    @property
    def epsilon(self) -> Optional[float]:
        if self.delta is None or not self.by_node:
            return None
        return max(r[P.EPSILON_SAMPLE] for r in self.by_node.values())

    def block(self) -> Optional[dict[str, Any]]:
        """The summary's ``privacy.sample``: the figures of the device with the largest epsilon."""
        if not self.by_node:
            return None
        worst = max(self.by_node.values(), key=lambda r: r[P.EPSILON_SAMPLE])
        return {
            "noise_multiplier": worst[P.NOISE_MULTIPLIER], "max_grad_norm": worst[P.MAX_GRAD_NORM],
            "sample_rate": worst[P.SAMPLE_RATE], "max_steps": int(worst[P.DP_STEPS]),
            "epsilon": worst[P.EPSILON_SAMPLE], "delta": self.delta, "accountant": self.accountant,
            "devices_unconfirmed": len(self.unconfirmed),
        }
