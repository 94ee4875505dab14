"""The outbound guard: a ClientApp mod that checks every reply before it leaves the device.

A reply may hold only model arrays with exactly the model's names and shapes (the update) and
scalar metrics from the allow-list of the run's privacy mode (:func:`allowed_metrics`):

* always: ``declined``, ``device-key`` (a random name);
* sample-level DP: the echo of the DP-SGD parameters the server sent (z, C, q, steps);
* user-level DP: the echo of the round's parameters (z, C, noise cohort, clipping) and the
  adaptive-clipping bit (sent to the trusted server under central noise only);
* no privacy at all: example count, training loss, and test WER/CER/loss with word and
  character counts (federated evaluation runs only then).

Anything else -- audio, features, transcripts, per-utterance values, timings, counts under DP, a
list-valued metric -- is refused, and the device sends an error instead. With ``audit_dir`` set,
the shape of every outgoing reply (never its values) is logged there as JSON lines.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Collection, Mapping, Optional

from flwr.app import ArrayRecord, Context, Message, MetricRecord
from flwr.clientapp.typing import ClientAppCallable, Mod

from fl import protocol as P
from fl.privacy.sample import SampleLevel
from fl.privacy.user import UserRound

_SAMPLE_ECHO = frozenset(SampleLevel(1.0, 1.0, 1.0, 1).echo())
_USER_ECHO = frozenset(UserRound(1.0, 1.0, 0).echo())
_NON_PRIVATE = frozenset({P.NUM_EXAMPLES, P.TRAIN_LOSS, P.WER, P.CER, P.LOSS, P.WORDS, P.CHARS})


def allowed_metrics(sample: bool, user: bool) -> frozenset[str]:
    """The metric names a device may send with sample-level and/or user-level DP on (see the module doc)."""
    allowed = {P.DECLINED, P.DEVICE_KEY}
    if sample:
        allowed |= _SAMPLE_ECHO
    if user:
        allowed |= _USER_ECHO | {P.CLIP_BIT}
    if not (sample or user):
        allowed |= _NON_PRIVATE
    return frozenset(allowed)


class OutboundViolation(RuntimeError):
    """A reply tried to carry something a device must not send."""


def check_reply(content_keys: list[str], arrays: Optional[ArrayRecord], metrics: Optional[MetricRecord],
                shapes: Mapping[str, tuple[int, ...]], allowed: Collection[str]) -> None:
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
            if name not in allowed:
                raise OutboundViolation(f"metric {name!r} may not leave the device in this privacy mode")
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise OutboundViolation(f"metric {name!r} is not a scalar")


def outbound_guard(shapes: Mapping[str, tuple[int, ...]], allowed: Collection[str],
                   audit_dir: Optional[str] = None) -> Mod:
    """A mod enforcing ``check_reply`` on every reply of the wrapped ClientApp."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(msg, context)
        if reply.has_error():
            return reply
        content = reply.content
        arrays = content[P.ARRAYS] if P.ARRAYS in content else None
        metrics = content[P.METRICS] if P.METRICS in content else None
        check_reply(list(content.keys()), arrays, metrics, shapes, allowed)
        if audit_dir is not None:
            row = {
                "type": msg.metadata.message_type, "records": sorted(content.keys()),
                "arrays": {k: list(v.shape) for k, v in arrays.items()} if arrays is not None else None,
                "metrics": {k: type(v).__name__ for k, v in metrics.items()} if metrics is not None else None,
            }
            Path(audit_dir).mkdir(parents=True, exist_ok=True)
            with open(Path(audit_dir) / f"outbound-{os.getpid()}.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        return reply

    return mod
