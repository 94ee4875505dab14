"""One federated round's messaging: send to a cohort, collect replies, distrust them, pool their metrics.

Every reply is checked against the global model before anything is computed from it
(:func:`check_update`: exactly the model's floating-point entries, the same shapes and dtypes,
finite values; :func:`example_weight`: a sane example count). A reply that fails is dropped with
its reason (:class:`Rejected`) and counted; it never crashes or poisons the round.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from torch import Tensor

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
    timeout: float, config: dict[str, Any], name: Callable[[int], int] = lambda node: node,
) -> Replies:
    """Send the global ``arrays`` and ``config`` to ``nodes`` and wait for replies (up to ``timeout`` s).

    Replies come back in the order of ``nodes`` whatever order they arrived in, so what is computed
    from them (sums of floats) does not depend on timing. A node that errs or stays silent counts
    once, in ``failed``; logs name devices by ``name`` (their stable key, once known).
    """
    content = RecordDict({P.ARRAYS: arrays, P.CONFIG: ConfigRecord({P.ROUND: server_round, **config})})
    messages = [Message(content=content, message_type=message_type, dst_node_id=n) for n in nodes]
    out = Replies()
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            # the code only: a device sends no free text (clients/guard.py), and Flower's own reasons may quote one
            log.warning("device %s failed in round %d: error %d (%s)", name(node), server_round, reply.error.code,
                        P.error_text(reply.error.code))
            out.failed.append(node)
        elif P.METRICS not in reply.content:
            log.warning("device %s sent a malformed reply in round %d", name(node), server_round)
            out.failed.append(node)
        else:
            out.ok.append(reply)
    order = {n: i for i, n in enumerate(nodes)}
    out.ok.sort(key=lambda m: order.get(m.metadata.src_node_id, len(order)))
    answered = {m.metadata.src_node_id for m in out.ok} | set(out.failed)
    silent = [n for n in nodes if n not in answered]
    if silent:
        log.warning("round %d: %d device(s) did not reply within %g s (offline or too slow): %s", server_round,
                    len(silent), timeout, [name(n) for n in silent[:10]])
    out.failed += silent
    return out


class Rejected(ValueError):
    """A reply the server drops; the message says why."""


MAX_EXAMPLES = 10_000_000
"""The largest example count a device may claim (FedAvg weights, without privacy only)."""


def check_update(arrays: ArrayRecord, reference: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A device's update as tensors, or :class:`Rejected`: it must hold exactly the global model's
    floating-point entries, each with the model's shape and dtype and only finite values."""
    expected = {k: v for k, v in reference.items() if v.is_floating_point()}
    names = set(arrays.keys())
    if names != set(expected):
        missing, extra = sorted(set(expected) - names), sorted(names - set(expected))
        raise Rejected(f"update entries differ from the model's (missing {missing[:3]}, extra {extra[:3]})")
    out: dict[str, Tensor] = {}
    for name, ref in expected.items():
        array = arrays[name]
        if tuple(array.shape) != tuple(ref.shape):
            raise Rejected(f"{name!r} has shape {tuple(array.shape)}, the model's is {tuple(ref.shape)}")
        if str(array.dtype) != str(ref.dtype).removeprefix("torch."):
            raise Rejected(f"{name!r} has dtype {array.dtype!r}, the model's is {ref.dtype}")
        try:
            t = torch.from_numpy(array.numpy().copy())
        except (ValueError, TypeError) as err:
            raise Rejected(f"{name!r} does not decode: {err}") from None
        if tuple(t.shape) != tuple(ref.shape) or not bool(torch.isfinite(t).all()):
            raise Rejected(f"{name!r} holds non-finite values")
        out[name] = t
    return out


def example_weight(metrics: Mapping[str, Any]) -> float:
    """A device's FedAvg weight (without privacy), or :class:`Rejected` for a missing or absurd count."""
    n = metrics.get(P.NUM_EXAMPLES)
    if isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n) or n != int(n) \
            or not 1 <= n <= MAX_EXAMPLES:
        raise Rejected(f"example count {n!r} is not an integer in [1, {MAX_EXAMPLES}]")
    return float(n)


def train(grid: Grid, nodes: list[int], arrays: ArrayRecord, server_round: int, timeout: float,
          config: dict[str, Any], name: Callable[[int], int] = lambda node: node) -> Replies:
    """A training round; a reply without arrays is a device declining (its budget is spent)."""
    return exchange(grid, nodes, MessageType.TRAIN, arrays, server_round, timeout, config, name)


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
