"""The outbound guard: a reply carries only the model's arrays and the metrics its privacy mode allows."""

import time

import pytest
import torch
from flwr.app import (ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, Metadata, MetricRecord,
                      RecordDict)
from flwr.common.serde import message_to_proto

from clients.guard import DeviceError, OutboundViolation, allowed_metrics, check_reply, outbound_guard
from fl import protocol as P
from fl.privacy.sample import SampleLevel
from fl.privacy.user import UserRound

SHAPES = {"w": (2, 3), "b": (3,)}
NONE, SAMPLE, USER, BOTH = (allowed_metrics(False, False), allowed_metrics(True, False),
                            allowed_metrics(False, True), allowed_metrics(True, True))
SAMPLE_ECHO = set(SampleLevel(1.0, 1.0, 0.25, 8).echo()) | set(
    SampleLevel(1.0, 1.0, 0.25, 8, noise="central", expected_batch=8.0, sum_cap=1.0).echo())
USER_ECHO = set(UserRound(1.0, 1.0, 0).echo())


def _arrays(**over):
    d = {"w": torch.zeros(2, 3), "b": torch.zeros(3)} | over
    return ArrayRecord(d)


def test_a_model_update_and_the_non_private_metrics_pass_without_privacy():
    check_reply(["arrays", "metrics"], _arrays(), MetricRecord({P.NUM_EXAMPLES: 3, P.WER: 0.5}), SHAPES, NONE)


def test_each_mode_allows_exactly_its_echo():
    always = {P.DECLINED, P.DEVICE_KEY}
    assert SAMPLE == always | SAMPLE_ECHO
    assert USER == always | USER_ECHO | {P.CLIP_BIT}
    assert BOTH == SAMPLE | USER
    assert NONE == always | {P.NUM_EXAMPLES, P.TRAIN_LOSS, P.WER, P.CER, P.LOSS, P.WORDS, P.CHARS}
    assert SAMPLE_ECHO == {"sample-z", "sample-c", "sample-q", "sample-steps", "sample-noise", "sample-batch",
                           "sample-sum-cap", "sample-noise-cohort"}
    assert USER_ECHO == {"user-z", "user-c", "user-noise-cohort", "user-clipping"}


@pytest.mark.parametrize("allowed", [SAMPLE, USER, BOTH], ids=["sample", "user", "both"])
def test_echo_and_declined_pass_under_privacy(allowed):
    echo = {**(SampleLevel(1.0, 1.0, 0.25, 8).echo() if allowed >= SAMPLE_ECHO else {}),
            **(UserRound(1.0, 1.0, 0, "adaptive").echo() if allowed >= USER_ECHO else {})}
    check_reply(["arrays", "metrics"], _arrays(), MetricRecord({**echo, P.DEVICE_KEY: 12345}), SHAPES, allowed)
    for code in P.DECLINE_REASONS:
        check_reply(["metrics"], None, MetricRecord({P.DECLINED: code}), SHAPES, allowed)
    for value in (0, 8, 1.5, 123456.0):  # a free-form number would be a channel out of the device
        with pytest.raises(OutboundViolation, match="DECLINE_REASONS"):
            check_reply(["metrics"], None, MetricRecord({P.DECLINED: value}), SHAPES, allowed)


@pytest.mark.parametrize("allowed", [SAMPLE, USER, BOTH], ids=["sample", "user", "both"])
@pytest.mark.parametrize("name", [P.NUM_EXAMPLES, P.TRAIN_LOSS, P.WER, P.LOSS, "seconds", "sample-rate",
                                  "empty-steps", "epsilon-sample"])
def test_counts_losses_timings_and_old_metrics_are_refused_under_privacy(allowed, name):
    with pytest.raises(OutboundViolation, match="may not leave"):
        check_reply(["metrics"], None, MetricRecord({name: 1.0}), SHAPES, allowed)


def test_one_level_s_echo_is_refused_under_the_other_and_without_privacy():
    with pytest.raises(OutboundViolation, match="user-z"):
        check_reply(["metrics"], None, MetricRecord({"user-z": 1.0}), SHAPES, SAMPLE)
    with pytest.raises(OutboundViolation, match="sample-z"):
        check_reply(["metrics"], None, MetricRecord({"sample-z": 1.0}), SHAPES, USER)
    for name in ("sample-z", "user-z", P.CLIP_BIT):
        with pytest.raises(OutboundViolation, match=name):
            check_reply(["metrics"], None, MetricRecord({name: 1.0}), SHAPES, NONE)
    with pytest.raises(OutboundViolation, match=P.CLIP_BIT):
        check_reply(["metrics"], None, MetricRecord({P.CLIP_BIT: 1.0}), SHAPES, SAMPLE)


@pytest.mark.parametrize("keys,arrays,metrics,match", [
    (["arrays", "metrics", "audio"], None, None, "records"),
    (["arrays"], _arrays(feats=torch.zeros(10, 64)), None, "not a model parameter"),
    (["arrays"], _arrays(w=torch.zeros(3, 2)), None, "shape"),
    (["metrics"], None, MetricRecord({"utterance-losses": [0.1, 0.2]}), "may not leave"),
    (["metrics"], None, MetricRecord({"wer": [0.1, 0.2]}), "not a scalar"),
])
def test_anything_else_is_refused(keys, arrays, metrics, match):
    with pytest.raises(OutboundViolation, match=match):
        check_reply(keys, arrays, metrics, SHAPES, NONE)


# --- nothing free-form leaves a device: errors leave as a fixed code -------------------------------

SECRET = "/home/alice/rec/clip7.wav: 'call my mother'"


def _incoming(message_type: str = MessageType.TRAIN) -> Message:
    meta = Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=7, reply_to_message_id="", group_id="1",
                    created_at=time.time(), ttl=600.0, message_type=message_type)
    return Message(content=RecordDict({P.CONFIG: ConfigRecord({P.ROUND: 1})}), metadata=meta)


def _context() -> Context:
    return Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})


def _wire(reply: Message) -> bytes:
    """The reply as it leaves the device (Flower's own serde)."""
    return message_to_proto(reply).SerializeToString()


def _assert_nothing_of(reply: Message, secret: str) -> None:
    wire = _wire(reply)
    words = secret.replace("'", " ").replace(":", " ").replace("/", " ").replace(".", " ").split()
    for part in [secret, *(w for w in words if len(w) >= 3)]:
        assert part.encode() not in wire, part
    assert reply.error.reason == P.DEVICE_ERRORS[reply.error.code]
    assert not reply.has_content()


@pytest.mark.parametrize("message_type,code", [(MessageType.TRAIN, P.ERROR_TRAINING),
                                               (MessageType.EVALUATE, P.ERROR_EVALUATION),
                                               (MessageType.QUERY, P.ERROR_FAILED)])
def test_an_exception_leaves_as_its_fixed_code_and_nothing_of_its_message(message_type, code, caplog):
    guard = outbound_guard(SHAPES, SAMPLE)

    def app(msg, context):
        raise FileNotFoundError(SECRET)

    with caplog.at_level("ERROR", logger="clients.guard"):
        reply = guard(_incoming(message_type), _context(), app)
    assert reply.has_error() and reply.error.code == code
    _assert_nothing_of(reply, SECRET)
    assert reply.metadata.reply_to_message_id == "m1" and reply.metadata.dst_node_id == 0
    assert SECRET in caplog.text  # logged on the device, for its owner


def test_an_error_reply_of_the_app_is_replaced_by_a_fixed_code():
    guard = outbound_guard(SHAPES, SAMPLE)
    free_text = lambda msg, context: Message(Error(code=2, reason=f"<class 'OSError'>:<'{SECRET}'>"), reply_to=msg)
    reply = guard(_incoming(), _context(), free_text)
    assert reply.error.code == P.ERROR_TRAINING
    _assert_nothing_of(reply, SECRET)


def test_an_outbound_violation_of_the_guard_itself_leaves_as_the_outbound_code():
    guard = outbound_guard(SHAPES, SAMPLE)
    leaky = lambda msg, context: Message(RecordDict({P.METRICS: MetricRecord({"clip7-call-my-mother": 1.0})}),
                                        reply_to=msg)
    reply = guard(_incoming(), _context(), leaky)
    assert reply.error.code == P.ERROR_OUTBOUND
    _assert_nothing_of(reply, "clip7-call-my-mother")
    raised = lambda msg, context: (_ for _ in ()).throw(OutboundViolation(SECRET))
    assert guard(_incoming(), _context(), raised).error.code == P.ERROR_OUTBOUND


def test_a_device_error_keeps_its_code_and_a_good_reply_passes_untouched():
    guard = outbound_guard(SHAPES, SAMPLE)
    refused = lambda msg, context: (_ for _ in ()).throw(DeviceError(P.ERROR_EVALUATION_REFUSED, SECRET))
    reply = guard(_incoming(MessageType.EVALUATE), _context(), refused)
    assert reply.error.code == P.ERROR_EVALUATION_REFUSED
    _assert_nothing_of(reply, SECRET)
    good = lambda msg, context: Message(RecordDict({P.METRICS: MetricRecord({P.DECLINED: 1})}), reply_to=msg)
    reply = guard(_incoming(), _context(), good)
    assert not reply.has_error() and reply.content[P.METRICS][P.DECLINED] == 1
    with pytest.raises(ValueError):
        DeviceError(7)  # only the table's codes exist


def test_the_error_codes_are_fixed_and_clear_of_flowers_own():
    from flwr.common.constant import ErrorCode

    flower = {v for k, v in vars(ErrorCode).items() if k.isupper()}
    assert not flower & set(P.DEVICE_ERRORS)
    assert P.error_text(P.ERROR_OUTBOUND) == P.DEVICE_ERRORS[P.ERROR_OUTBOUND]
    assert P.error_text(2) == "Flower error code 2"


@pytest.mark.parametrize("run_private", [True, False], ids=["run-private", "run-none-device-floor"])
def test_the_client_app_refuses_evaluation_under_privacy_with_its_code(run_private):
    """The real ClientApp: an evaluate message gets code 103 and nothing else, both under the run's
    sample-level DP and when the run config switches privacy off but the device's own policy (the
    deployed defaults: noise floors) asks for DP: a run config cannot open the device's test set."""
    from clients.client_app import DeviceSettings, make_client_app
    from fl.config import DevicePolicy, ModelConfig, SamplePrivacyConfig, TrainConfig

    class NoStore:
        def data(self, context):
            raise AssertionError("a refused evaluation must not read the device's recordings")

        def state(self, context):
            raise AssertionError

        def key(self, context):
            return 1

    tiny = ModelConfig(n_mels=32, d_model=48, layers=2, heads=2, conv_kernel=7, dropout=0.0)
    settings = DeviceSettings(tiny, TrainConfig(), SamplePrivacyConfig() if run_private else None, None, seed=0,
                              policy=DevicePolicy())
    assert not settings.evaluates and DeviceSettings(tiny, TrainConfig(), None, None, seed=0,
                                                     policy=DevicePolicy.permissive()).evaluates
    app = make_client_app(settings, NoStore())
    reply = app(_incoming(MessageType.EVALUATE), _context())
    assert reply.has_error() and reply.error.code == P.ERROR_EVALUATION_REFUSED
    assert reply.error.reason == P.DEVICE_ERRORS[P.ERROR_EVALUATION_REFUSED]


# --- the two records of what was sent: the server's inventory at receipt, the device owner's log -----

class _LoopbackGrid:
    """A grid whose devices are ``apps`` (node id -> the device's ClientApp callable), answering in process."""

    def __init__(self, apps):
        self.apps = apps

    def send_and_receive(self, messages, *, timeout=None):
        return [self.apps[m.metadata.dst_node_id](m, _context()) for m in messages]


def _ask(grid, nodes):
    return grid.send_and_receive([_incoming_to(n) for n in nodes], timeout=1.0)


def _incoming_to(node: int) -> Message:
    msg = _incoming()
    msg.metadata.dst_node_id = node
    return msg


def test_the_servers_inventory_records_what_arrived_even_what_a_guard_should_have_refused(tmp_path):
    """The inventory is taken from what reaches the server, not from the guard: a device without one
    (or with a broken one) shows up with its extra metric; a guarded one with its fixed error code."""
    from server.inbound import InboundInventory, read_inventory

    leaky = lambda msg, context: Message(RecordDict({P.ARRAYS: _arrays(), P.METRICS: MetricRecord(
        {P.DECLINED: 1, "clip7-call-my-mother": 1.0, "losses": [0.1, 0.2]})}), reply_to=msg)
    guard = outbound_guard(SHAPES, SAMPLE)
    grid = InboundInventory(_LoopbackGrid({1: leaky, 2: lambda msg, context: guard(msg, context, leaky)}), tmp_path)
    replies = _ask(grid, [1, 2])
    assert [r.metadata.src_node_id for r in replies] == [1, 2]  # handed on untouched
    unguarded, guarded = read_inventory(tmp_path)
    assert unguarded == {"type": "train", "node": 1, "group": "1", "error": None, "records": ["arrays", "metrics"],
                         "arrays": {"arrays": {"w": [2, 3], "b": [3]}}, "configs": {},
                         "metrics": {"metrics": {"declined": "int", "clip7-call-my-mother": "float",
                                                 "losses": "list[float]"}},
                         "lengths": {"metrics": {"losses": 2}}}
    assert guarded["error"] == {"code": P.ERROR_OUTBOUND, "fixed_reason": True} and guarded["records"] == []
    assert (tmp_path / "inbound").stat().st_mode & 0o777 == 0o700  # who replied: the experimenter's alone
    assert (tmp_path / "inbound" / "replies.jsonl").stat().st_mode & 0o777 == 0o600


def test_the_device_owners_log_lists_the_replies_the_guard_let_through(tmp_path):
    import json

    guard = outbound_guard(SHAPES, SAMPLE, str(tmp_path))
    good = lambda msg, context: Message(RecordDict({P.METRICS: MetricRecord({P.DECLINED: 1})}), reply_to=msg)
    leaky = lambda msg, context: Message(RecordDict({P.METRICS: MetricRecord({"seconds": 1.0})}), reply_to=msg)
    guard(_incoming(), _context(), good)
    guard(_incoming(), _context(), leaky)
    rows = [json.loads(line) for f in tmp_path.glob("outbound-*.jsonl") for line in f.read_text().splitlines()]
    assert rows == [{"type": "train", "records": ["metrics"], "arrays": None, "metrics": {"declined": "int"}}]
