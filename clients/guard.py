"""The outbound guard: a ClientApp mod that checks every reply before it leaves the device.

A reply may hold only model arrays with exactly the model's names and shapes (the update) and
scalar metrics from the protocol's list. Anything else -- audio, features, transcripts,
per-utterance values, a list-valued metric -- is refused, and the device sends an error instead.
With ``audit_dir`` set, the shape of every outgoing reply (never its values) is logged there as
JSON lines, so a run can be inspected afterwards.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Optional

from flwr.app import ArrayRecord, Context, Message, MetricRecord
from flwr.clientapp.typing import ClientAppCallable, Mod

from fl import protocol as P

ALLOWED_METRICS = frozenset({
    P.NUM_EXAMPLES, P.TRAIN_LOSS, P.EPSILON_SAMPLE, P.DP_STEPS, P.EMPTY_STEPS, P.SAMPLE_RATE,
    P.NOISE_MULTIPLIER, P.MAX_GRAD_NORM, P.SECONDS, P.WER, P.CER, P.LOSS, P.WORDS, P.CHARS,
    P.DECLINED, P.CLIP_BIT, P.DEVICE_KEY,
})


class OutboundViolation(RuntimeError):
    """A reply tried to carry something a device must not send."""


def check_reply(content_keys: list[str], arrays: Optional[ArrayRecord], metrics: Optional[MetricRecord],
                shapes: Mapping[str, tuple[int, ...]]) -> None:
    extra = set(content_keys) - {P.ARRAYS, P.METRICS}
    if extra:
        raise OutboundViolation(f"reply carries records {sorted(extra)}; only arrays and metrics may leave")
    if arrays is not None:
        for name, array in arrays.items():
            if name not in shapes:
                raise OutboundViolation(f"array {name!r} is not a model parameter")
            if tuple(array.shape) != shapes[name]:
                raise OutboundViolation(f"array {name!r} has shape {tuple(array.shape)}, the model's is {shapes[name]}")
    if metrics is not None:
        for name, value in metrics.items():
            if name not in ALLOWED_METRICS:
                raise OutboundViolation(f"metric {name!r} is not in the protocol")
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise OutboundViolation(f"metric {name!r} is not a scalar")


def outbound_guard(shapes: Mapping[str, tuple[int, ...]], audit_dir: Optional[str] = None) -> Mod:
    """A mod enforcing ``check_reply`` on every reply of the wrapped ClientApp."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(msg, context)
        if reply.has_error():
            return reply
        content = reply.content
        arrays = content[P.ARRAYS] if P.ARRAYS in content else None
        metrics = content[P.METRICS] if P.METRICS in content else None
        check_reply(list(content.keys()), arrays, metrics, shapes)
        if audit_dir is not None:
            row = {
                "type": msg.metadata.message_type, "node": context.node_id, "records": sorted(content.keys()),
                "arrays": {k: list(v.shape) for k, v in arrays.items()} if arrays is not None else None,
                "metrics": {k: type(v).__name__ for k, v in metrics.items()} if metrics is not None else None,
            }
            Path(audit_dir).mkdir(parents=True, exist_ok=True)
            with open(Path(audit_dir) / f"outbound-{os.getpid()}.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        return reply

    return mod
