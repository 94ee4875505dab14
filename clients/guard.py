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
list-valued metric -- is refused, and the device sends an error instead. With ``audit_dir`` set
(a deployed device's ``--audit-dir``), the shape of every reply this guard let through (never its
values) is logged there as JSON lines: the device owner's own record. Being written after
``check_reply`` passed, it can only agree with the allow-list, so it is no evidence that the guard
works; that is the server's inventory of what it received (``server/inbound.py``).

Nothing free-form leaves a device: every error reply of the wrapped app, and every exception it
raises (an :class:`OutboundViolation` of this guard's own included), is replaced by a Flower error
reply holding only a code of ``fl.protocol.DEVICE_ERRORS`` and that code's fixed text
(:func:`error_reply`). The exception itself -- its message may name a file or quote a transcript
-- is logged on the device only (the SuperNode's console, or the simulation's).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable, Collection, Mapping, Optional

from flwr.app import ArrayRecord, Context, Error, Message, MessageType, MetricRecord
from flwr.clientapp.typing import ClientAppCallable, Mod

from fl import protocol as P
from fl.privacy.sample import SampleLevel
from fl.privacy.user import UserRound

_SAMPLE_ECHO = frozenset(SampleLevel(1.0, 1.0, 1.0, 1).echo()) | frozenset(
    SampleLevel(1.0, 1.0, 1.0, 1, noise="distributed", expected_batch=1.0, sum_cap=1.0, noise_cohort=3).echo())
_USER_ECHO = frozenset(UserRound(1.0, 1.0, 0).echo())
_NON_PRIVATE = frozenset({P.NUM_EXAMPLES, P.TRAIN_LOSS, P.WER, P.CER, P.LOSS, P.WORDS, P.CHARS})

log = logging.getLogger(__name__)


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


class DeviceError(RuntimeError):
    """A failure with a fixed code of ``fl.protocol.DEVICE_ERRORS``: the code is all of it that leaves."""

    def __init__(self, code: int, detail: str = "") -> None:
        if code not in P.DEVICE_ERRORS:
            raise ValueError(f"{code} is not a device error code")
        super().__init__(detail or P.DEVICE_ERRORS[code])
        self.code = code


_BY_TYPE = {MessageType.TRAIN: P.ERROR_TRAINING, MessageType.EVALUATE: P.ERROR_EVALUATION}


def error_code(msg: Message, err: Optional[BaseException] = None, code: Optional[int] = None) -> int:
    """The fixed code for ``err`` (or for an error reply's ``code``) raised while handling ``msg``."""
    if isinstance(err, DeviceError):
        return err.code
    if isinstance(err, OutboundViolation):
        return P.ERROR_OUTBOUND
    if code in P.DEVICE_ERRORS:
        return int(code)  # type: ignore[arg-type]
    return _BY_TYPE.get(msg.metadata.message_type.split(".")[0], P.ERROR_FAILED)


def error_reply(msg: Message, code: int) -> Message:
    """The reply to ``msg`` that says only ``code`` and its fixed text."""
    return Message(Error(code=code, reason=P.DEVICE_ERRORS[code]), reply_to=msg)


def coded_errors(msg: Message, handle: Callable[[], Message]) -> Message:
    """``handle()``'s reply, or -- if it raised or replied with an error -- a fixed-code error reply.

    The exception, or the replaced error's reason, is logged here, on the device, and nowhere else.
    """
    try:
        reply = handle()
    except Exception as err:  # noqa: BLE001 -- whatever failed, only its code leaves the device
        code = error_code(msg, err)
        log.error("%s message failed; the server gets error code %d only", msg.metadata.message_type, code,
                  exc_info=err)
        return error_reply(msg, code)
    if reply.has_error():
        code = error_code(msg, code=reply.error.code)
        if reply.error.code != code or reply.error.reason != P.DEVICE_ERRORS[code]:
            log.error("%s message failed (%s); the server gets error code %d only", msg.metadata.message_type,
                      reply.error.reason, code)
        return error_reply(msg, code)
    return reply


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
            if name == P.DECLINED and value not in P.DECLINE_REASONS:
                raise OutboundViolation(f"declined={value!r} is not a code of fl.protocol.DECLINE_REASONS")


def outbound_guard(shapes: Mapping[str, tuple[int, ...]], allowed: Collection[str],
                   audit_dir: Optional[str] = None) -> Mod:
    """A mod enforcing ``check_reply`` on every reply of the wrapped ClientApp; any failure, its own
    included, leaves as a fixed error code (``coded_errors``)."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        return coded_errors(msg, lambda: checked(msg, call_next(msg, context)))

    def checked(msg: Message, reply: Message) -> Message:
        if reply.has_error():
            return reply  # replaced by coded_errors
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
