"""Federated feature statistics: per-site sufficient statistics, combined on the server.

Each site sends, per feature, the count of observed (non-missing) values, their mean and the
sum of squared deviations (M2). The server merges them with Chan et al.'s pairwise update,
which gives exactly the pooled mean and variance without any row leaving a site and without
the cancellation of a naive sum-of-squares formula.
"""

from __future__ import annotations

import numpy as np


def local_moments(x: np.ndarray) -> dict[str, list[float]]:
    """Per-feature count, mean and M2 of a site's rows, ignoring NaN (missing) values."""
    x = np.asarray(x, dtype=np.float64)
    observed = ~np.isnan(x)
    count = observed.sum(axis=0).astype(np.float64)
    total = np.where(observed, x, 0.0).sum(axis=0)
    mean = np.divide(total, count, out=np.zeros_like(total), where=count > 0)
    dev = np.where(observed, x - mean, 0.0)
    m2 = (dev**2).sum(axis=0)
    return {"count": count.tolist(), "mean": mean.tolist(), "m2": m2.tolist()}


def combine_moments(parts: list[dict[str, list[float]]]) -> dict[str, list[float]]:
    """Merge per-site moments into global count, mean, M2, variance and std per feature."""
    if not parts:
        raise ValueError("no site statistics to combine")
    count = np.zeros(len(parts[0]["count"]))
    mean = np.zeros_like(count)
    m2 = np.zeros_like(count)
    for part in parts:
        n_b = np.asarray(part["count"], dtype=np.float64)
        mean_b = np.asarray(part["mean"], dtype=np.float64)
        m2_b = np.asarray(part["m2"], dtype=np.float64)
        n = count + n_b
        delta = mean_b - mean
        safe_n = np.where(n > 0, n, 1.0)
        mean = mean + delta * n_b / safe_n
        m2 = m2 + m2_b + delta**2 * count * n_b / safe_n
        count = n
    var = np.divide(m2, count, out=np.zeros_like(m2), where=count > 0)
    std = np.sqrt(var)
    return {
        "count": count.tolist(),
        "mean": mean.tolist(),
        "m2": m2.tolist(),
        "var": var.tolist(),
        "std": std.tolist(),
    }


def standardize(x: np.ndarray, stats: dict[str, list[float]]) -> np.ndarray:
    """Centre and scale with global statistics; missing values become the mean (0 after)."""
    mean = np.asarray(stats["mean"])
    std = np.asarray(stats["std"])
    std = np.where(std > 0, std, 1.0)  # a constant feature stays 0 instead of dividing by 0
    z = (np.asarray(x, dtype=np.float64) - mean) / std
    return np.nan_to_num(z, nan=0.0).astype(np.float32)
