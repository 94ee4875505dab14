"""One federated round's messaging: send to a cohort, collect replies, pool their metrics."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fl import protocol as P

log = logging.getLogger(__name__)


@dataclass
class Replies:
    """Replies of one round, split into usable ones and failures (errors or malformed)."""

    ok: list[Message] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)

    def metric(self, key: str) -> list[float]:
        return [float(m.content[P.METRICS][key]) for m in self.ok if key in m.content[P.METRICS]]


def exchange(
    grid: Grid, nodes: list[int], message_type: str, arrays: ArrayRecord, server_round: int,
    timeout: float, config: dict[str, Any],
) -> Replies:
    """Send the global ``arrays`` and ``config`` to ``nodes`` and wait for replies (up to ``timeout`` s).

    Replies come back in the order of ``nodes`` whatever order they arrived in, so what is computed
    from them (sums of floats) does not depend on timing.
    """
    content = RecordDict({P.ARRAYS: arrays, P.CONFIG: ConfigRecord({P.ROUND: server_round, **config})})
    messages = [Message(content=content, message_type=message_type, dst_node_id=n) for n in nodes]
    out = Replies()
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            log.warning("device %s failed in round %d: %s", node, server_round, reply.error.reason)
            out.failed.append(node)
        elif P.METRICS not in reply.content:
            log.warning("device %s sent a malformed reply in round %d", node, server_round)
            out.failed.append(node)
        else:
            out.ok.append(reply)
    order = {n: i for i, n in enumerate(nodes)}
    out.ok.sort(key=lambda m: order.get(m.metadata.src_node_id, len(order)))
    answered = {m.metadata.src_node_id for m in out.ok} | set(out.failed)
    out.failed += [n for n in nodes if n not in answered]
    return out


def train(grid: Grid, nodes: list[int], arrays: ArrayRecord, server_round: int, timeout: float,
          config: dict[str, Any]) -> Replies:
    """A training round; a reply without arrays is a device declining (its budget is spent)."""
    return exchange(grid, nodes, MessageType.TRAIN, arrays, server_round, timeout, config)


def pooled_error_rates(replies: Replies) -> tuple[float | None, float | None]:
    """Corpus WER/CER over every replying device's test words/characters."""
    words, chars = sum(replies.metric(P.WORDS)), sum(replies.metric(P.CHARS))
    if not words:
        return None, None
    word_errors = sum(w * n for w, n in zip(replies.metric(P.WER), replies.metric(P.WORDS)))
    char_errors = sum(c * n for c, n in zip(replies.metric(P.CER), replies.metric(P.CHARS)))
    return word_errors / words, char_errors / chars


def evaluate(grid: Grid, nodes: list[int], arrays: ArrayRecord, server_round: int, timeout: float,
             config: dict[str, Any]) -> Replies:
    return exchange(grid, nodes, MessageType.EVALUATE, arrays, server_round, timeout, config)
