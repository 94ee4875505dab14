"""Device side of a secure-aggregation round: mods that let the ordinary ``train`` run under SecAgg+.

Flower's ``secaggplus_mod`` answers the protocol's setup, share-keys and unmask messages itself;
at the collect-masked-vectors stage it calls the app below it, converts the reply with the legacy
``recorddict_to_fitres`` and replaces its arrays with one masked, quantised integer vector. Our
``train`` speaks ``arrays``/``config`` in and ``arrays``/``metrics`` out, so ``fitres_adapter``
sits between the two:

    inbound   fitins.parameters ("0".."n-1") + fitins.config (names)  ->  arrays (by name) + config
    outbound  arrays (the update) + metrics  ->  fitres.parameters (float64, the update's entries
              in the global model's order), fitres.num_examples = 1 (unweighted sum),
              fitres.metrics (our scalars), fitres.status

and it refuses to contribute if the server's ``noise-cohort`` exceeds the SecAgg+ threshold this
device will enforce (a decodable sum could then carry less noise than accounted), or if the
server's ``clipping_range`` is below what a clipped, noised update needs (SecAgg+ clips every
coordinate to it before masking, which would cut the noise share). A reply without
an update (a device that declines) is an error here: the device drops out of the secure round.
The clear scalars of the reply (``fitres.metrics``) are the same allow-listed echo as in ordinary
rounds (``clients/guard.py``).

Mods, outermost first (``ClientApp`` applies app-level mods outside function-level ones, so the
existing app-level ``outbound_guard`` must move to ``evaluate``)::

    @app.train(mods=secure_train_mods(shapes, allowed) + [outbound_guard(shapes, allowed, audit_dir)])

``secure_outbound_guard`` checks what actually leaves under SecAgg+; the ordinary
``outbound_guard``, innermost, still checks the clear update before it is quantised and masked.
"""

from __future__ import annotations

import logging
from typing import Any, Collection, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common import Code, FitRes, Status, bytes_to_ndarray, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key
from flwr.compat.common.recorddict_compat import fitres_to_recorddict

from clients.guard import DeviceError, OutboundViolation, check_reply, coded_errors, error_code
from fl import protocol as P
from fl.config import SamplePrivacyConfig
from fl.privacy import masks
from fl.privacy.sample import NOISE as SAMPLE_NOISE
from fl.privacy.sample import SampleLevel
from fl.privacy.secagg import SECURE_NAMES, clipping_range_for
from fl.privacy.user import WIRE_C, WIRE_CLIPPING, WIRE_COHORT, WIRE_Z, UserRound

log = logging.getLogger(__name__)

FITINS_ARRAYS, FITINS_CONFIG = "fitins.parameters", "fitins.config"
FITRES_ARRAYS, FITRES_EXAMPLES = "fitres.parameters", "fitres.num_examples"
FITRES_METRICS, FITRES_STATUS = "fitres.metrics", "fitres.status"
MAX_OPAQUE_BYTES = 2048
# what secaggplus_mod itself puts in its replies, per stage
_SECAGG_REPLY_KEYS = {Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2, Key.DESTINATION_LIST, Key.CIPHERTEXT_LIST,
                      Key.MASKED_PARAMETERS, Key.NODE_ID_LIST, Key.SHARE_LIST}

masks.install()


def _shares(config: Mapping[str, Any], numel: int) -> list[tuple[int, float]]:
    """For each noise share the request asks for (user level, DP-FedSGD): its noise cohort and the
    SecAgg+ range a clipped, noised contribution of ``numel`` coordinates needs."""
    out = []
    if all(k in config for k in (WIRE_Z, WIRE_C, WIRE_COHORT, WIRE_CLIPPING)):
        share = UserRound.from_message(config)
        out.append((share.noise_cohort, clipping_range_for(share.clip_norm, share.device_std, numel, 1)))
    elif WIRE_COHORT in config:  # a cohort without the rest of the mechanism: still never above the threshold
        out.append((int(config[WIRE_COHORT]), 0.0))  # type: ignore[arg-type]
    if SAMPLE_NOISE in config:
        sample = SampleLevel.from_message(config, SamplePrivacyConfig())
        if sample.aggregated:
            out.append((sample.noise_cohort, clipping_range_for(sample.sum_cap, sample.device_std, numel, 1)))
    return out


def fitres_adapter(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Translate between the legacy FitIns/FitRes layout of SecAgg+ and our train message (see module doc)."""
    if msg.metadata.message_type != MessageType.TRAIN or FITINS_ARRAYS not in msg.content:
        return call_next(msg, context)
    config = dict(msg.content.config_records[FITINS_CONFIG])
    names = [str(n) for n in config.pop(SECURE_NAMES)]  # type: ignore[union-attr]
    legacy = msg.content.array_records[FITINS_ARRAYS]
    weights = {name: bytes_to_ndarray(legacy[str(i)].data) for i, name in enumerate(names)}
    secagg = context.state.config_records[RECORD_KEY_STATE]
    threshold = int(secagg["threshold"])  # type: ignore[arg-type]
    bound = float(secagg["clipping_range"])  # type: ignore[arg-type]
    numel = max(1, sum(w.size for w in weights.values() if w.dtype.kind == "f"))
    for cohort, needed in _shares(config, numel):
        if cohort > threshold:
            raise OutboundViolation(f"noise cohort {cohort} exceeds the SecAgg+ threshold {threshold}: the decoded "
                                    "sum could carry less noise than accounted; not contributing")
        if not bound >= needed:  # SecAgg+ clips each coordinate to the range: it would cut the noise share
            raise OutboundViolation(f"SecAgg+ range {bound:.4g} is below the {needed:.4g} a clipped, noised update "
                                    "needs: range clipping would remove part of the noise; not contributing")
    msg.content = RecordDict({P.ARRAYS: ArrayRecord({k: Array(v) for k, v in weights.items()}),
                              P.CONFIG: ConfigRecord(config)})  # type: ignore[arg-type]
    reply = call_next(msg, context)
    if reply.has_error():  # already a fixed code (the inner outbound guard): keep it, not contributing
        raise DeviceError(error_code(msg, code=reply.error.code), "train failed, not contributing to the secure sum")
    if P.ARRAYS not in reply.content:
        raise DeviceError(P.ERROR_SECURE_LEFT, "no update to contribute (declined?): leaving this secure round")
    update = {k: a.numpy() for k, a in reply.content.array_records[P.ARRAYS].items()}
    order = [k for k in names if weights[k].dtype.kind == "f"]
    if set(update) != set(order):
        raise OutboundViolation(f"the update's entries {sorted(update)} are not the model's float entries")
    vector = [update[k].astype(np.float64) for k in order]
    largest = max((float(np.abs(v).max()) for v in vector if v.size), default=0.0)
    if largest > bound:
        log.warning("an update coordinate (%.3g) exceeds SecAgg+'s range %.3g: it will be clipped", largest, bound)
    metrics = dict(reply.content.metric_records[P.METRICS]) if P.METRICS in reply.content else {}
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(vector), 1, metrics)  # type: ignore[arg-type]
    return Message(fitres_to_recorddict(fitres, False), reply_to=msg)


def check_secure_reply(content: RecordDict, shapes: Mapping[str, tuple[int, ...]], allowed: Collection[str]) -> None:
    """What may leave a device during a SecAgg+ round: protocol keys and bytes, the masked vector
    (one integer array per float parameter plus the weight), an empty fitres array record,
    num_examples = 1, and the ``allowed`` metrics."""
    records = {RECORD_KEY_CONFIGS, FITRES_ARRAYS, FITRES_EXAMPLES, FITRES_METRICS, FITRES_STATUS}
    extra = set(content.keys()) - records
    if extra or RECORD_KEY_CONFIGS not in content:
        raise OutboundViolation(f"secure reply carries records {sorted(content.keys())}")
    protocol = content.config_records[RECORD_KEY_CONFIGS]
    if set(protocol.keys()) - _SECAGG_REPLY_KEYS:
        raise OutboundViolation(f"secure reply carries protocol keys {sorted(protocol.keys())}")
    for key, value in protocol.items():  # keys, ciphertexts and shares: opaque, but small (~0.2-0.6 KiB)
        if key != Key.MASKED_PARAMETERS and any(isinstance(b, bytes) and len(b) > MAX_OPAQUE_BYTES
                                                 for b in (value if isinstance(value, list) else [value])):
            raise OutboundViolation(f"protocol field {key!r} carries more than {MAX_OPAQUE_BYTES} bytes per item")
    if Key.MASKED_PARAMETERS in protocol:
        masked = [bytes_to_ndarray(b) for b in protocol[Key.MASKED_PARAMETERS]]  # type: ignore[union-attr]
        # the weight, then one array per float parameter; the float shapes are a subset of the model's
        if len(masked) < 2 or masked[0].shape != (1,) or any(a.dtype.kind not in "iu" for a in masked):
            raise OutboundViolation("masked vector is not a weight plus integer arrays")
        if len(masked) - 1 > len(shapes) or not all(tuple(a.shape) in set(shapes.values()) for a in masked[1:]):
            raise OutboundViolation("masked vector does not have the model's shapes")
    if FITRES_ARRAYS in content and len(content.array_records[FITRES_ARRAYS]) > 0:
        raise OutboundViolation("secure reply carries arrays in clear")
    if FITRES_EXAMPLES in content and dict(content.metric_records[FITRES_EXAMPLES]) != {"num_examples": 1}:
        raise OutboundViolation("secure reply must weigh every device 1")
    if FITRES_METRICS in content:
        metrics = MetricRecord(dict(content.config_records[FITRES_METRICS]))  # type: ignore[arg-type]
        check_reply([P.METRICS], None, metrics, shapes, allowed)
    if FITRES_STATUS in content and dict(content.config_records[FITRES_STATUS]) != {"code": 0, "message": ""}:
        raise OutboundViolation("a secure reply's status must be plain OK")


def secure_outbound_guard(shapes: Mapping[str, tuple[int, ...]], allowed: Collection[str]) -> Mod:
    """Outermost mod of a SecAgg+ train function: every reply must pass ``check_secure_reply``, and
    any failure below (the protocol's, the adapter's, the inner guard's) leaves as a fixed error code
    only (``clients.guard.coded_errors``)."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        def handle() -> Message:
            reply = call_next(msg, context)
            if not reply.has_error():
                check_secure_reply(reply.content, shapes, allowed)
            return reply

        return coded_errors(msg, handle)

    return mod


_LATEST = "secure-latest-round"


def stale_round_guard(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Refuse a SecAgg+ message of an older round than one already seen (its group id is the round).

    A stage that timed out on the server can leave its message queued; delivered after a newer
    round's messages it would reset ``secaggplus_mod``'s state mid-protocol and abort that round.
    """
    if msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content:
        try:
            server_round = int(msg.metadata.group_id)
        except ValueError:
            raise OutboundViolation(f"secure message without a round id ({msg.metadata.group_id!r})") from None
        seen = context.state.config_records.get(_LATEST, ConfigRecord({"round": server_round}))
        if server_round < int(seen["round"]):  # type: ignore[arg-type]
            raise RuntimeError(f"stale secure-aggregation message of round {server_round} (seen {seen['round']})")
        context.state.config_records[_LATEST] = ConfigRecord({"round": server_round})
    return call_next(msg, context)


def strong_masks(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Make sure this process masks with ChaCha20 (``fl/privacy/masks.py``) before SecAgg+ runs.

    Module import already installs it; doing it again here covers processes (Ray workers) that
    received the app by pickling, where import order is not ours to choose.
    """
    masks.install()
    return call_next(msg, context)


def secure_train_mods(shapes: Mapping[str, tuple[int, ...]], allowed: Collection[str]) -> list[Mod]:
    """Function-level mods for ``@app.train`` under secure aggregation, outermost first."""
    return [secure_outbound_guard(shapes, allowed), stale_round_guard, strong_masks, secaggplus_mod, fitres_adapter]

