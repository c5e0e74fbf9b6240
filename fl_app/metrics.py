"""Per-site and pooled metrics of each round, gathered from the sites' replies."""

from __future__ import annotations

import math
from typing import Any

from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from fl_app.threshold import (
    DEFAULT_RULE,
    choose_threshold,
    parse_rule,
    sigmoid,
    validation_groups,
)
from tasks.score_groups import SCORE_KEYS, class_count, pooled_auc

SITE_RECORD = "site"  # ConfigRecord in every reply: {"name": <site name>}
# Further k-patient score groups a task may send (prefix -> pooled AUC key): film-level
# scores of a patch model, and the mean-intensity baseline (tasks.mammography_patches).
EXTRA_SCORES = {"film-": "film_auc", "intensity-": "intensity_auc"}
# Per-site values that must never be written anywhere: adaptive clipping's clipped bit (only
# its noisy sum over sites is released, strategies.central_dp)
PRIVATE_TRAIN_KEYS = ("norm_bit",)


def site_name(reply: RecordDict) -> str:
    """The site name a ClientApp put in its reply."""
    return str(reply[SITE_RECORD]["name"]) if SITE_RECORD in reply else "unknown-site"


def metrics_of(reply: RecordDict) -> dict[str, Any]:
    """The (only) MetricRecord of a reply as a plain dict."""
    record = next(iter(reply.metric_records.values()))
    return dict(record)


def pooled_metrics(per_site: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Metrics over all sites' test data pooled.

    Loss, accuracy, sensitivity and specificity are exact example-weighted means; AUC comes
    from the sites' k-patient score groups (see tasks.score_groups.pooled_auc).
    """
    sites = list(per_site.values())
    if not sites:
        return {}
    total = sum(int(s["num-examples"]) for s in sites)
    pooled: dict[str, Any] = {"num-examples": total}
    for key in ("loss", "accuracy"):
        pooled[key] = sum(float(s[key]) * int(s["num-examples"]) for s in sites) / total
    if all(k in sites[0] for k in SCORE_KEYS):
        pooled["auc"] = pooled_auc(sites)
        # sensitivity/specificity pooled exactly from per-site counts
        n_pos = [class_count(s, "pos") for s in sites]
        n_neg = [class_count(s, "neg") for s in sites]
        pooled["sensitivity"] = _weighted(sites, "sensitivity", n_pos)
        pooled["specificity"] = _weighted(sites, "specificity", n_neg)
        pooled["num-positive"], pooled["num-negative"] = sum(n_pos), sum(n_neg)
    else:
        pooled["auc"] = _weighted(sites, "auc", [int(s["num-examples"]) for s in sites])
    for prefix, key in EXTRA_SCORES.items():
        groups = prefixed_groups(sites, prefix)
        if groups is not None:
            pooled[key] = pooled_auc(groups)
            pooled[f"{prefix}num-examples"] = int(sum(s[f"{prefix}num-examples"] for s in sites))
    if "threshold-logit" in sites[0]:
        pooled["threshold_logit"] = float(sites[0]["threshold-logit"])
        pooled["threshold"] = sigmoid(pooled["threshold_logit"])
    return pooled


def prefixed_groups(sites: list[dict[str, Any]], prefix: str) -> list[dict[str, Any]] | None:
    """Every site's score groups stored under ``prefix`` (prefix removed); None if a site
    has none."""
    keys = [prefix + k for k in SCORE_KEYS]
    if not all(k in s for s in sites for k in keys):
        return None
    return [{k: s[prefix + k] for k in SCORE_KEYS} for s in sites]


def choose_site_threshold(per_site: dict[str, dict[str, Any]], rule_text: object = DEFAULT_RULE
                          ) -> float | None:
    """The logit threshold of ``task.threshold`` from the sites' validation score groups
    (fl_app.threshold); None for the default 0.5, for non-binary tasks, or when a rule that
    needs validation data finds none (then the sites' argmax, i.e. 0.5, stays)."""
    rule = parse_rule(rule_text)
    sites = list(per_site.values())
    if rule.is_default or not sites or not all("sensitivity" in s for s in sites):
        return None
    groups = validation_groups(sites)
    if rule.needs_validation and groups is None:
        return None
    try:
        return choose_threshold(rule, groups)
    except ValueError:
        return None


def _weighted(sites: list[dict[str, Any]], key: str, weights: list[int]) -> float:
    pairs = [(float(s[key]), w) for s, w in zip(sites, weights, strict=True) if w > 0]
    pairs = [(v, w) for v, w in pairs if not math.isnan(v)]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else math.nan


def public_site_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """A site's metrics without score groups (they only feed pooled values, under any
    prefix: ``val-``, ``film-``, ``intensity-``), with its test set's class counts
    ``num-positive`` / ``num-negative`` (a binary task; the counts the groups already release)
    so the run report can turn sensitivity and specificity into confusion counts."""
    public = {k: v for k, v in metrics.items() if not k.endswith(SCORE_KEYS)}
    if all(k in metrics for k in SCORE_KEYS):
        public["num-positive"] = class_count(metrics, "pos")
        public["num-negative"] = class_count(metrics, "neg")
    return public


class SiteMetricsCollector:
    """Flower metric aggregators that also keep each site's own metrics of the latest round.

    Pass ``collector.train`` / ``collector.evaluate`` as the strategy's
    ``train_metrics_aggr_fn`` / ``evaluate_metrics_aggr_fn``; read ``last_train`` and
    ``last_evaluate`` (site -> metrics) after the round.
    """

    def __init__(self, threshold: object = DEFAULT_RULE) -> None:
        self.threshold = threshold  # task.threshold: how the operating threshold is chosen
        self.threshold_logit: float | None = None  # chosen after the latest evaluation
        self.last_train: dict[str, dict[str, Any]] = {}
        self.last_evaluate: dict[str, dict[str, Any]] = {}
        self.last_pooled: dict[str, Any] = {}

    def train(self, replies: list[RecordDict], weight_key: str) -> MetricRecord:
        """Keep per-site training metrics; return Flower's weighted average.

        Adaptive clipping's per-site ``norm_bit`` is dropped from both (its exact mean would
        be the un-noised clipped count).
        """
        self.last_train = {site_name(r): {k: v for k, v in metrics_of(r).items()
                                          if k not in PRIVATE_TRAIN_KEYS} for r in replies}
        pooled = aggregate_metricrecords(replies, weight_key)
        return MetricRecord({k: v for k, v in pooled.items() if k not in PRIVATE_TRAIN_KEYS})

    def evaluate(self, replies: list[RecordDict], weight_key: str) -> MetricRecord:
        """Keep per-site evaluation metrics; return the pooled metrics."""
        self.last_evaluate = {site_name(r): metrics_of(r) for r in replies}
        self.last_pooled = pooled_metrics(self.last_evaluate)
        # the operating threshold this round's model would get (fl_app.threshold)
        self.threshold_logit = choose_site_threshold(self.last_evaluate, self.threshold)
        return MetricRecord({k: float(v) for k, v in self.last_pooled.items()
                             if isinstance(v, (int, float))})

    def reset(self) -> None:
        """Forget the latest round (called at the start of each round)."""
        self.last_train, self.last_evaluate, self.last_pooled = {}, {}, {}
