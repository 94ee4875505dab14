import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord

from clients.guard import OutboundViolation, check_reply

SHAPES = {"w": (2, 3), "b": (3,)}


def _arrays(**over):
    d = {"w": torch.zeros(2, 3), "b": torch.zeros(3)} | over
    return ArrayRecord(d)


def test_a_model_update_and_protocol_metrics_pass():
    check_reply(["arrays", "metrics"], _arrays(), MetricRecord({"num-examples": 3, "wer": 0.5}), SHAPES)


@pytest.mark.parametrize("keys,arrays,metrics,match", [
    (["arrays", "metrics", "audio"], None, None, "records"),
    (["arrays"], _arrays(feats=torch.zeros(10, 64)), None, "not a model parameter"),
    (["arrays"], _arrays(w=torch.zeros(3, 2)), None, "shape"),
    (["metrics"], None, MetricRecord({"utterance-losses": [0.1, 0.2]}), "not in the protocol"),
    (["metrics"], None, MetricRecord({"wer": [0.1, 0.2]}), "not a scalar"),
])
def test_anything_else_is_refused(keys, arrays, metrics, match):
    with pytest.raises(OutboundViolation, match=match):
        check_reply(keys, arrays, metrics, SHAPES)
