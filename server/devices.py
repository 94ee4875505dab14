"""The connected devices in a stable order: by the key each device names itself with.

Flower gives a node a new id every time it (or a simulation) starts, so node ids cannot carry a
run across a restart. At the start of a run the server asks every node for its key (a QUERY
message; simulated devices answer their partition id, deployed ones a random number they keep,
``clients/local.py``). Cohorts are drawn over the sorted keys and the privacy ledger is kept by
key, so a resumed run (``server/checkpoint.py``) picks the same devices as the run it continues.
"""

from __future__ import annotations

import logging

from flwr.app import ArrayRecord, MessageType
from flwr.serverapp import Grid

from fl import protocol as P
from server.rounds import Replies, exchange

log = logging.getLogger(__name__)


class Devices:
    """Node ids by device key; ``keys`` is the stable order every round uses."""

    def __init__(self, node_of: dict[int, int]) -> None:
        self.node_of = dict(node_of)
        self.keys = sorted(self.node_of)
        self._key_of = {n: k for k, n in self.node_of.items()}

    def nodes(self, keys: list[int]) -> list[int]:
        return [self.node_of[k] for k in keys]

    def key_of(self, node: int) -> int:
        return self._key_of[node]


CHUNK = 256
"""Nodes asked at a time: a message to each of 10,000 nodes at once would crowd the link's queue."""


def identify(grid: Grid, nodes: list[int], timeout: float) -> Devices:
    """Ask ``nodes`` for their keys. Raises if two nodes claim one key (one device started twice)."""
    replies = Replies()
    for i in range(0, len(nodes), CHUNK):
        part = exchange(grid, nodes[i:i + CHUNK], MessageType.QUERY, ArrayRecord(), 0, timeout, {})
        replies.ok += part.ok
        replies.failed += part.failed
    node_of: dict[int, int] = {}
    for m in replies.ok:
        node, metrics = m.metadata.src_node_id, m.content[P.METRICS]
        if P.DEVICE_KEY not in metrics:
            log.warning("device %s did not name itself; it takes part under its node id", node)
            replies.failed.append(node)
            continue
        key = int(metrics[P.DEVICE_KEY])
        if key in node_of:
            raise RuntimeError(f"nodes {node_of[key]} and {node} both claim device key {key}: one device's state "
                               "folder is used by two SuperNodes")
        node_of[key] = node
    for node in replies.failed:
        log.warning("device %s did not answer the start-of-run query; it takes part under its node id", node)
        node_of.setdefault(node, node)
    return Devices(node_of)
