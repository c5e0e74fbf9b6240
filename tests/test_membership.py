"""Membership-inference audit (fl_app/site_audits.py, fl_app/after_training.py).

Unit: the loss-threshold attack's AUC on losses with known separation, and its class
stratification (a different class mix between members and non-members is not membership).
End to end: tests/test_contribution.py's clean heart-disease run also runs the audit
(summary.json ``membership_inference``, the audit trail's ``membership`` stage).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fl_app.site_audits import example_losses, membership_attack_auc


def test_attack_auc_separates_lower_member_losses_and_not_equal_ones() -> None:
    rng = np.random.default_rng(0)
    members, others = rng.exponential(0.1, 2000), rng.exponential(0.5, 2000)
    assert membership_attack_auc(members, others) > 0.8
    same = membership_attack_auc(rng.exponential(0.3, 2000), rng.exponential(0.3, 2000))
    assert abs(same - 0.5) < 0.03
    # exactly the scikit-learn AUC of -loss with members as positives
    from sklearn.metrics import roc_auc_score

    labels = np.r_[np.ones(2000), np.zeros(2000)]
    assert membership_attack_auc(members, others) == pytest.approx(
        roc_auc_score(labels, -np.r_[members, others]))


def test_class_stratified_auc_ignores_a_different_class_mix() -> None:
    """Class 1 has lower losses than class 0 for members and non-members alike; members are
    mostly class 1. Pooled, the attack 'finds' members; within each class it does not."""
    rng = np.random.default_rng(1)

    def losses(n0: int, n1: int) -> tuple[np.ndarray, np.ndarray]:
        return (np.r_[rng.exponential(1.0, n0), rng.exponential(0.1, n1)],
                np.r_[np.zeros(n0, int), np.ones(n1, int)])

    m, ml = losses(200, 1800)
    o, ol = losses(1800, 200)
    assert membership_attack_auc(m, o) > 0.75
    assert abs(membership_attack_auc(m, o, ml, ol) - 0.5) < 0.04


def test_example_losses_are_the_per_example_cross_entropy() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    x, y = torch.randn(10, 3), torch.tensor([0, 1] * 5)
    losses, labels = example_losses(model, TensorDataset(x, y), torch.device("cpu"))
    expected = nn.functional.cross_entropy(model(x), y, reduction="none").detach().numpy()
    assert losses == pytest.approx(expected.astype(np.float64), abs=1e-6)
    assert labels.tolist() == y.tolist()
