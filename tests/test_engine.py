"""Local training: the FedProx term really changes the update; metrics match scikit-learn."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import TensorDataset

from fl_app.metrics import pooled_metrics
from tasks import engine
from tasks.breast_cancer import _dataset


def _train_once(mu: float, start: nn.Module, loader) -> nn.Module:
    model = nn.Sequential(nn.Linear(30, 2))
    model.load_state_dict(start.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine.train(model, loader, epochs=3, optimizer=opt, device=torch.device("cpu"), proximal_mu=mu)
    return model


def _data():
    x, y, _ = _dataset()
    x = (x - x.mean(0)) / x.std(0)
    return TensorDataset(torch.tensor(x, dtype=torch.float32), torch.tensor(y))


def test_fedprox_term_pulls_the_update_towards_the_global_model() -> None:
    torch.manual_seed(0)
    start = nn.Sequential(nn.Linear(30, 2))
    data = _data()
    plain = _train_once(0.0, start, engine.make_loader(data, 32, True, seed=1))
    prox = _train_once(1.0, start, engine.make_loader(data, 32, True, seed=1))
    w0 = torch.cat([p.flatten() for p in start.parameters()])
    d_plain = (torch.cat([p.flatten() for p in plain.parameters()]) - w0).norm()
    d_prox = (torch.cat([p.flatten() for p in prox.parameters()]) - w0).norm()
    assert not torch.allclose(d_plain, d_prox)
    assert d_prox < 0.8 * d_plain


def test_proximal_term_value() -> None:
    model = nn.Sequential(nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[3.0, 4.0]]))
    term = engine.proximal_term(model, [torch.zeros(1, 2)], mu=0.5)
    assert term.item() == 0.25 * 25


def test_site_metrics_and_pooled_auc_match_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    labels = [rng.integers(0, 2, n) for n in (50, 120, 31)]
    # a model's probabilities: sigmoid of its logits (never exactly 0 or 1 here)
    scores = [1 / (1 + np.exp(-rng.normal(1.5 * (2 * y - 1), 1.5))) for y in labels]
    per_site = {}
    for i, (y, s) in enumerate(zip(labels, scores, strict=True)):
        probs = np.stack([1 - s, s], axis=1)
        m = engine.classification_metrics(y, probs, loss_sum=float(len(y)))
        assert m["auc"] == roc_auc_score(y, s)
        assert m["accuracy"] == ((s > 0.5) == y).mean()
        per_site[f"site-{i}"] = m
    pooled = pooled_metrics(per_site)
    y_all, s_all = np.concatenate(labels), np.concatenate(scores)
    # k-patient score groups of sites with 31-120 test patients: error stated in docs/privacy.md
    assert abs(pooled["auc"] - roc_auc_score(y_all, s_all)) < 3e-3
    assert pooled["accuracy"] == ((s_all > 0.5) == y_all).mean()
    assert pooled["num-examples"] == len(y_all)
    assert abs(pooled["sensitivity"] - ((s_all > 0.5)[y_all == 1]).mean()) < 1e-12


def test_single_class_site_has_undefined_auc() -> None:
    m = engine.classification_metrics(np.ones(5, int), np.full((5, 2), 0.5), 1.0)
    assert np.isnan(m["auc"])


def test_site_without_test_examples_gets_one_clear_error() -> None:
    # 500 simulated chest X-ray hospitals share 624 test films: some get none
    import pytest

    from tasks.base import DataError, SiteData

    data = _data()
    empty = TensorDataset(torch.zeros(0, 30), torch.zeros(0, dtype=torch.long))
    site = SiteData(name="site-379", train=data, test=empty, num_classes=2)
    with pytest.raises(DataError, match=r"site site-379 has no test examples.*fewer sites"):
        engine.evaluate_site(nn.Sequential(nn.Linear(30, 2)), site, torch.device("cpu"))


def test_site_dealt_no_validation_image_sends_the_same_keys() -> None:
    """Many simulated sites: one may get no validation example. It must still send the
    ``val-`` keys (empty groups), or Flower refuses the round's evaluate replies."""
    from tasks.base import SiteData

    data = _data()
    model = nn.Sequential(nn.Linear(30, 2))
    empty = TensorDataset(torch.zeros(0, 30), torch.zeros(0, dtype=torch.long))
    with_val = engine.evaluate_site(model, SiteData("a", data, data, 2, val=data),
                                    torch.device("cpu"))
    without = engine.evaluate_site(model, SiteData("b", data, data, 2, val=empty),
                                   torch.device("cpu"))
    assert set(with_val) == set(without)
    assert without["val-score-pos-count"] == [] and without["val-score-neg-suppressed"] == 0
