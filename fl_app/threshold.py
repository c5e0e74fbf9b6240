"""The operating threshold of a binary model (``task.threshold``), chosen federatedly.

A patient is called positive when the model's logit score ``log p1/p0`` is at or above the
threshold (the probability threshold is its sigmoid). Rules:
- a number, e.g. ``0.5`` (the default, what argmax of two softmax outputs does): a fixed
  probability threshold;
- ``youden``: maximises sensitivity + specificity - 1 (Youden's J);
- ``sensitivity:<s>``, e.g. ``sensitivity:0.95``: the highest threshold that still keeps
  sensitivity >= s (the screening use: miss at most 1 - s of the diseased).

Federated, with the same rule as the pooled AUC (no per-patient score leaves a site): each
site sends its VALIDATION split's k-patient score groups (``tasks.score_groups``, prefix
``val-``); the server pools them and estimates sensitivity and specificity at any threshold
with each group modelled as a normal distribution of its mean and s.d. (the model of
``score_groups.pooled_auc``), then picks the threshold. After the last round the server sends
that threshold to the sites, which report their exact accuracy, sensitivity and specificity
at it on their TEST split (fl_app.experiment).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tasks.score_groups import SCORE_KEYS

DEFAULT_RULE = "0.5"
VAL_PREFIX = "val-"
# Thresholds are searched on this grid of logits (plus every group mean): 0.01 apart.
GRID_STEP = 0.01


@dataclass(frozen=True)
class ThresholdRule:
    """A parsed ``task.threshold``: ``kind`` fixed / youden / sensitivity, and its value."""

    kind: str
    value: float | None = None

    @property
    def needs_validation(self) -> bool:
        """Whether the threshold is chosen from validation data (not fixed)."""
        return self.kind != "fixed"

    @property
    def is_default(self) -> bool:
        """The fixed 0.5 of argmax: the sites' own metrics already use it."""
        return self.kind == "fixed" and self.value == 0.5


def parse_rule(text: object) -> ThresholdRule:
    """``0.5`` / ``youden`` / ``sensitivity:0.95`` -> ThresholdRule; ValueError otherwise."""
    raw = str(text).strip().lower()
    if raw == "youden":
        return ThresholdRule("youden")
    if raw.startswith("sensitivity:"):
        value = _number(raw.split(":", 1)[1], text)
        if not 0.0 < value < 1.0:
            raise ValueError(f"task.threshold '{text}': the sensitivity must be in (0, 1)")
        return ThresholdRule("sensitivity", value)
    value = _number(raw, text)
    if not 0.0 < value < 1.0:
        raise ValueError(f"task.threshold '{text}' must be a probability in (0, 1)")
    return ThresholdRule("fixed", value)


def rule_of(cfg: Any) -> ThresholdRule:
    """The config's ``task.threshold`` rule (0.5 for a task without the key); a bad rule is a
    ConfigError before any training starts."""
    from fl_app.config import ConfigError

    try:
        return parse_rule(cfg.task.get("threshold", DEFAULT_RULE))
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _number(raw: str, text: object) -> float:
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"task.threshold '{text}' is not a number, 'youden' or "
                         "'sensitivity:<s>' (e.g. sensitivity:0.95)") from None


def logit(probability: float) -> float:
    """log(p / (1 - p))."""
    return math.log(probability) - math.log1p(-probability)


def sigmoid(value: float) -> float:
    """The probability of a logit."""
    return 1.0 / (1.0 + math.exp(-value)) if value >= 0 else math.exp(value) / (1 + math.exp(value))


def validation_groups(sites: Sequence[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """The sites' validation score groups with the ``val-`` prefix removed (None when a site
    sent none)."""
    keys = [VAL_PREFIX + k for k in SCORE_KEYS]
    if not sites or not all(k in s for s in sites for k in keys):
        return None
    return [{k: s[VAL_PREFIX + k] for k in SCORE_KEYS} for s in sites]


def _groups(sites: Sequence[dict[str, Any]], name: str) -> tuple[np.ndarray, ...]:
    counts, means, sds = [], [], []
    for site in sites:
        counts += list(site[f"score-{name}-count"])
        means += list(site[f"score-{name}-mean"])
        sds += list(site[f"score-{name}-sd"])
    return np.asarray(counts, float), np.asarray(means, float), np.asarray(sds, float)


def share_above(groups: tuple[np.ndarray, ...], thresholds: np.ndarray) -> np.ndarray:
    """Estimated share of a class's patients scoring >= each threshold (normal groups)."""
    counts, means, sds = groups
    diff = means[None, :] - thresholds[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        above = np.where(sds[None, :] > 0, ndtr(diff / np.where(sds > 0, sds, 1.0)[None, :]),
                         (diff >= 0).astype(float))
    return (above * counts[None, :]).sum(axis=1) / counts.sum()


def choose_threshold(rule: ThresholdRule, sites: Sequence[dict[str, Any]] | None) -> float:
    """The logit threshold ``rule`` picks from the sites' (unprefixed) validation groups.

    A fixed rule needs no data. Raises ValueError when the groups lack a class.
    """
    if rule.kind == "fixed":
        assert rule.value is not None
        return logit(rule.value)
    if not sites:
        raise ValueError(f"task.threshold={rule.kind} needs the sites' validation data")
    pos, neg = _groups(sites, "pos"), _groups(sites, "neg")
    if pos[0].sum() == 0 or neg[0].sum() == 0:
        raise ValueError(f"task.threshold={rule.kind} needs validation patients of both "
                         "classes (groups of fewer than k patients are suppressed)")
    means = np.concatenate([pos[1], neg[1]])
    spread = float(np.concatenate([pos[2], neg[2]]).max(initial=0.0)) * 4 + 1.0
    grid = np.arange(means.min() - spread, means.max() + spread, GRID_STEP)
    grid = np.unique(np.concatenate([grid, means]))
    sens, spec = share_above(pos, grid), 1.0 - share_above(neg, grid)
    if rule.kind == "youden":
        j = sens + spec
        best = np.flatnonzero(j >= j.max() - 1e-9)
        return float(grid[best[len(best) // 2]])  # middle of a plateau of equal J
    assert rule.value is not None
    return float(grid[np.flatnonzero(sens >= rule.value).max()])


def rates_at(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    """Exact accuracy, sensitivity and specificity of logit ``scores`` at ``threshold``."""
    predicted = scores >= threshold
    pos, neg = labels == 1, labels == 0
    return {
        "accuracy": float((predicted == (labels == 1)).mean()) if len(labels) else math.nan,
        "sensitivity": float(predicted[pos].mean()) if pos.any() else math.nan,
        "specificity": float((~predicted[neg]).mean()) if neg.any() else math.nan,
    }


def ndtr(x: Any) -> Any:
    """SciPy's standard normal CDF, imported on first use: this module is imported by every
    ClientApp process, most of which never need SciPy (~0.3 s to import)."""
    from scipy.special import ndtr as scipy_ndtr

    return scipy_ndtr(x)
