"""Pooled AUC from k-patient score groups: accurate for confident models, no patient singled out.

Each site releases, per class, groups of at least k = MIN_GROUP_SIZE patients (count, mean and
s.d. of their logit scores); the server estimates the pooled AUC from the groups of all sites.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from fl_app.config import compose_config
from fl_app.metrics import pooled_metrics, public_site_metrics
from tasks import SiteRef, engine, get_task
from tasks.federated_stats import combine_moments
from tasks.score_groups import (
    MIN_GROUP_SIZE,
    SCORE_KEYS,
    logit_scores,
    score_groups,
    score_metrics,
)


def sites_from_logits(logits: list[np.ndarray], labels: list[np.ndarray]) -> dict[str, dict]:
    """Each site's metrics as its ClientApp computes them, from two-class logits."""
    out = {}
    for i, (z, y) in enumerate(zip(logits, labels, strict=True)):
        two = torch.tensor(np.stack([np.zeros_like(z), z], axis=1), dtype=torch.float32)
        probs = torch.softmax(two, dim=1).numpy()
        loss = float(torch.nn.functional.cross_entropy(two, torch.tensor(y), reduction="sum"))
        scores = logit_scores(two)
        out[f"site-{i}"] = engine.classification_metrics(y, probs, loss, scores)
    return out


def test_pooled_auc_is_within_1e3_on_saturated_scores():
    """Logit s.d. 25: most float32 probabilities are exactly 0 or 1."""
    rng = np.random.default_rng(0)
    labels = [rng.integers(0, 2, n) for n in (400, 900, 250, 600)]
    logits = [rng.normal(10.0 * (2 * y - 1), 25.0) for y in labels]
    per_site = sites_from_logits(logits, labels)
    y_all, z_all = np.concatenate(labels), np.concatenate(logits)
    probs32 = torch.sigmoid(torch.tensor(z_all, dtype=torch.float32)).numpy()
    assert np.mean((probs32 == 0) | (probs32 == 1)) > 0.25  # saturated float32 probabilities
    reference = roc_auc_score(y_all, z_all)
    # the regime where anything binned on probabilities fails: even exact float32 scores tie
    assert abs(roc_auc_score(y_all, probs32) - reference) > 1e-3
    pooled = pooled_metrics(per_site)
    assert abs(pooled["auc"] - reference) <= 1e-3, (pooled["auc"], reference)
    for name, m in per_site.items():  # each site's own AUC stays exact
        i = int(name.split("-")[1])
        assert m["auc"] == pytest.approx(roc_auc_score(labels[i], logits[i]), abs=1e-12)


def test_groups_hold_at_least_k_patients_and_small_classes_release_only_a_count():
    scores = np.arange(23, dtype=float)
    groups = score_groups(scores)
    assert groups["count"] == [5, 5, 5, 8] and groups["suppressed"] == 0
    assert groups["mean"][0] == pytest.approx(2.0) and groups["mean"][-1] == pytest.approx(18.5)
    assert score_groups(np.array([0.3, 0.9, 0.1, 0.2])) == {
        "count": [], "mean": [], "sd": [], "suppressed": 4}


def test_no_released_value_at_a_small_real_site_depends_on_one_patient(shared_data):
    """Switzerland (heart disease): 16 test patients, 1000 bins gave each its own bin."""
    cfg = compose_config(f"task=heart_disease task.data_dir={shared_data / 'heart_disease'}")
    task = get_task("heart_disease")
    raw = [task.load_site(cfg, SiteRef(n, index=i)) for i, n in enumerate(task.site_names(cfg))]
    stats = combine_moments([task.local_statistics(s) for s in raw])
    site = task.apply_statistics(next(s for s in raw if s.name == "switzerland"), stats)
    torch.manual_seed(0)
    model = task.build_model(cfg, site.info)
    metrics = engine.evaluate(model, engine.make_loader(site.test, 256, False, 0),
                              torch.device("cpu"))
    n = metrics["num-examples"]
    labels = np.array([int(site.test[i][1]) for i in range(n)])
    for name, members in (("pos", labels == 1), ("neg", labels == 0)):
        counts = metrics[f"score-{name}-count"]
        assert all(c >= MIN_GROUP_SIZE for c in counts)  # the rule
        assert sum(counts) + metrics[f"score-{name}-suppressed"] == members.sum()
        if members.sum() < MIN_GROUP_SIZE:
            assert counts == [] and metrics[f"score-{name}-mean"] == []
    assert set(SCORE_KEYS) <= set(metrics)
    assert not set(SCORE_KEYS) & set(public_site_metrics(metrics))  # never written to files


def test_score_metrics_keys_are_the_released_interface():
    labels = np.array([0, 1] * 10)
    out = score_metrics(labels, np.linspace(-3, 3, 20))
    assert set(out) == set(SCORE_KEYS)
