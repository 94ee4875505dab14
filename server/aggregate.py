"""Federated averaging of model weights."""

from __future__ import annotations

from typing import Sequence

import torch
from flwr.app import ArrayRecord


def fedavg(updates: Sequence[ArrayRecord], weights: Sequence[float] | None = None) -> ArrayRecord:
    """Weighted mean of the devices' updates (or weights) (unweighted when ``weights`` is None)."""
    if not updates:
        raise ValueError("fedavg needs at least one update")
    w = torch.tensor(weights if weights is not None else [1.0] * len(updates), dtype=torch.float64)
    if len(w) != len(updates) or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError(f"bad aggregation weights {list(w.tolist())} for {len(updates)} updates")
    w = w / w.sum()
    states = [u.to_torch_state_dict() for u in updates]
    keys = list(states[0])
    for s in states[1:]:
        if list(s) != keys or any(s[k].shape != states[0][k].shape for k in keys):
            raise ValueError("updates disagree on the model's arrays or shapes")
    out = {}
    for k in keys:
        ref = states[0][k]
        acc = sum(float(wi) * s[k].to(torch.float64) for wi, s in zip(w, states))
        out[k] = acc.to(ref.dtype)
    return ArrayRecord(out)
