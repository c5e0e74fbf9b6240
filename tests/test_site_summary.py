"""summary.json's per-site part: means, one-class sites and the worst site."""

import math

import pytest

from fl_app.results import site_summary


def test_site_summary_skips_one_class_sites_and_names_the_worst_site() -> None:
    per_site = {
        "a": {"accuracy": 0.9, "auc": 0.95},
        "b": {"accuracy": 0.6, "auc": 0.70},
        "c": {"accuracy": 0.75, "auc": math.nan},  # test set with one class: no AUC
    }
    summary = site_summary({"accuracy": 0.8}, per_site)
    assert summary["mean_site_accuracy"] == pytest.approx(0.75)
    assert summary["mean_site_auc"] == pytest.approx(0.825)
    assert summary["one_class_sites"] == 1
    assert summary["worst_site"]["accuracy"] == {
        "site": "b", "value": 0.6, "gap_to_mean": pytest.approx(0.15)}
    assert summary["worst_site"]["auc"]["site"] == "b"
    assert summary["worst_site"]["auc"]["gap_to_mean"] == pytest.approx(0.125)


def test_site_summary_of_no_sites_has_no_means() -> None:
    summary = site_summary({}, {})
    assert summary["mean_site_accuracy"] is None and summary["mean_site_auc"] is None
    assert summary["worst_site"] == {}
