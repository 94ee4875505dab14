"""The outbound guard: a reply carries only the model's arrays and the metrics its privacy mode allows."""

import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord

from clients.guard import OutboundViolation, allowed_metrics, check_reply
from fl import protocol as P
from fl.privacy.sample import SampleLevel
from fl.privacy.user import UserRound

SHAPES = {"w": (2, 3), "b": (3,)}
NONE, SAMPLE, USER, BOTH = (allowed_metrics(False, False), allowed_metrics(True, False),
                            allowed_metrics(False, True), allowed_metrics(True, True))
SAMPLE_ECHO = set(SampleLevel(1.0, 1.0, 0.25, 8).echo())
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
    assert SAMPLE_ECHO == {"sample-z", "sample-c", "sample-q", "sample-steps"}
    assert USER_ECHO == {"user-z", "user-c", "user-noise-cohort", "user-clipping"}


@pytest.mark.parametrize("allowed", [SAMPLE, USER, BOTH], ids=["sample", "user", "both"])
def test_echo_and_declined_pass_under_privacy(allowed):
    echo = {**(SampleLevel(1.0, 1.0, 0.25, 8).echo() if allowed >= SAMPLE_ECHO else {}),
            **(UserRound(1.0, 1.0, 0, "adaptive").echo() if allowed >= USER_ECHO else {})}
    check_reply(["arrays", "metrics"], _arrays(), MetricRecord({**echo, P.DEVICE_KEY: 12345}), SHAPES, allowed)
    check_reply(["metrics"], None, MetricRecord({P.DECLINED: 1}), SHAPES, allowed)


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
