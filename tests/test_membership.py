"""The membership-inference figures: AUC and TPR at low FPR, and the loss attack on a model that memorised."""

import random

import pytest
import torch

from fl.audit.membership import loss_attack, roc_auc, tpr_at_fpr
from fl.config import TrainConfig
from fl.train import plain_round, utterance_losses
from tests.conftest import fake_examples


def brute_force_auc(m, n):
    pairs = [(a > b) + 0.5 * (a == b) for a in m for b in n]
    return sum(pairs) / len(pairs)


def test_auc_extremes_and_ties():
    assert roc_auc([3, 4, 5], [0, 1, 2]) == 1.0
    assert roc_auc([0, 1, 2], [3, 4, 5]) == 0.0
    assert roc_auc([1, 1, 1], [1, 1]) == 0.5
    assert roc_auc([2, 1], [1, 0]) == pytest.approx(brute_force_auc([2, 1], [1, 0]))


def test_auc_matches_the_pairwise_definition_on_random_scores():
    rng = random.Random(0)
    for _ in range(20):
        m = [rng.choice(range(10)) + rng.random() * (rng.random() < 0.5) for _ in range(rng.randint(1, 30))]
        n = [rng.choice(range(10)) for _ in range(rng.randint(1, 30))]
        assert roc_auc(m, n) == pytest.approx(brute_force_auc(m, n))


def test_tpr_at_fpr_respects_the_false_positive_budget():
    nonmembers = list(range(200))  # scores 0..199
    members = [150.5, 197.5, 198.5, 250.0]
    # 1% of 200 = 2 non-members may score above the threshold: the threshold is the third-highest (197)
    assert tpr_at_fpr(members, nonmembers, 0.01) == 0.75
    assert tpr_at_fpr(members, nonmembers, 0.0) == 0.25  # above every non-member: only 250
    assert tpr_at_fpr([1.0], [1.0], 0.0) == 0.0  # a tie is not flagged


def test_loss_attack_scores_low_loss_as_member():
    result = loss_attack([0.1, 0.2], [1.0, 2.0, 3.0])
    assert result.auc == 1.0 and result.tpr_at_1pct_fpr == 1.0
    assert (result.members, result.nonmembers) == (2, 3)


def test_attack_detects_a_model_that_memorised_its_training_set(conformer):
    torch.manual_seed(0)
    members, nonmembers = fake_examples(8, seed=1), fake_examples(24, seed=2)
    nonmembers = [e.__class__("n" + e.id, e.speaker, e.feats, e.tokens, e.text) for e in nonmembers]
    model = conformer.new_module()
    before = utterance_losses(conformer, model, members + nonmembers)
    untrained = loss_attack([before[e.id] for e in members], [before[e.id] for e in nonmembers])
    plain_round(model, conformer, members, TrainConfig(local_steps=150, batch_size=8, lr=3e-3), 0)
    after = utterance_losses(conformer, model, members + nonmembers)
    trained = loss_attack([after[e.id] for e in members], [after[e.id] for e in nonmembers])
    assert trained.auc > 0.95 and trained.tpr_at_1pct_fpr > 0.5
    assert trained.auc > untrained.auc


def brute_force_tpr(m, n, fpr):
    """The best true-positive rate of any threshold that flags at most floor(fpr * |n|) non-members."""
    allowed = int(fpr * len(n) + 1e-9)
    thresholds = [t for t in [float("-inf"), *n] if sum(x > t for x in n) <= allowed]
    return max(sum(x > t for x in m) / len(m) for t in thresholds)


def test_the_runs_membership_figures_are_the_attack_on_its_own_losses(smoke_run):
    """The smoke run's published AUC and TPR, recomputed from the losses it kept privately (score = -loss)."""
    import json

    run = smoke_run / "run"
    mia = json.loads((run / "audit.json").read_text())["membership"]
    losses = json.loads((run / "private" / "audit-losses.json").read_text())["membership"]
    members = [-x for x in losses["members"]]
    assert mia["members"] == len(members) > 0
    for population in ("same_speakers", "other_speakers"):
        others = [-x for x in losses[population]]
        assert mia[population]["members"] == len(members) and mia[population]["nonmembers"] == len(others) > 0
        assert mia[population]["auc"] == pytest.approx(brute_force_auc(members, others), abs=1e-12)
        assert mia[population]["tpr_at_1pct_fpr"] == pytest.approx(brute_force_tpr(members, others, 0.01))
