import pytest
import torch
from flwr.app import ArrayRecord

from server.aggregate import fedavg


def _rec(value: float) -> ArrayRecord:
    return ArrayRecord({"w": torch.full((2, 2), value), "b": torch.full((3,), value)})


def test_fedavg_weighted_and_unweighted():
    out = fedavg([_rec(1.0), _rec(3.0)], [1, 3]).to_torch_state_dict()
    assert torch.allclose(out["w"], torch.full((2, 2), 2.5))
    out = fedavg([_rec(1.0), _rec(3.0)]).to_torch_state_dict()
    assert torch.allclose(out["b"], torch.full((3,), 2.0))


def test_fedavg_rejects_mismatched_updates():
    with pytest.raises(ValueError):
        fedavg([])
    with pytest.raises(ValueError):
        fedavg([_rec(1.0), ArrayRecord({"w": torch.zeros(2, 2)})])
    with pytest.raises(ValueError):
        fedavg([_rec(1.0)], [0.0])
