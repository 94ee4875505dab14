"""Loss-threshold membership inference (Yeom et al. 2018) against the final model.

The attacker scores each utterance by its negative CTC loss under the model (lower loss: more
likely a training member) and thresholds it. We report the threshold-free ROC AUC (0.5 = no
better than chance) and the true-positive rate at a 1% false-positive rate, the low-FPR regime
that matters for privacy (Carlini et al. 2022). This is one simple attack: a low score does not
prove the absence of leakage; only the DP guarantee bounds every attack.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class AttackResult:
    """How well losses separate members from non-members."""

    auc: float
    tpr_at_1pct_fpr: float
    members: int
    nonmembers: int


def roc_auc(member_scores: Sequence[float], nonmember_scores: Sequence[float]) -> float:
    """P(score of a random member > score of a random non-member), ties counting one half."""
    m = np.asarray(member_scores, dtype=np.float64)
    n = np.asarray(nonmember_scores, dtype=np.float64)
    if not len(m) or not len(n):
        raise ValueError("AUC needs at least one member and one non-member")
    scores = np.concatenate([m, n])
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average ranks over ties
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    u = ranks[: len(m)].sum() - len(m) * (len(m) + 1) / 2
    return float(u / (len(m) * len(n)))


def tpr_at_fpr(member_scores: Sequence[float], nonmember_scores: Sequence[float], fpr: float = 0.01) -> float:
    """The largest fraction of members flagged by a threshold that flags at most ``fpr`` of non-members.

    A member is flagged when its score is strictly above the threshold; with ``k = floor(fpr * N)``
    non-members allowed above it, the threshold is the (k+1)-th highest non-member score.
    """
    m = np.asarray(member_scores, dtype=np.float64)
    n = np.sort(np.asarray(nonmember_scores, dtype=np.float64))[::-1]
    if not len(m) or not len(n):
        raise ValueError("TPR needs at least one member and one non-member")
    allowed = math.floor(fpr * len(n) + 1e-9)
    threshold = n[allowed] if allowed < len(n) else -np.inf
    return float(np.mean(m > threshold))


def loss_attack(member_losses: Sequence[float], nonmember_losses: Sequence[float]) -> AttackResult:
    """The loss-threshold attack: score = -loss."""
    members = [-x for x in member_losses]
    nonmembers = [-x for x in nonmember_losses]
    return AttackResult(roc_auc(members, nonmembers), tpr_at_fpr(members, nonmembers), len(members), len(nonmembers))
