"""Shared pieces of the tabular tasks: models, per-site split, federated standardisation."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import TensorDataset

from tasks.base import DataError, SiteData
from tasks.federated_stats import local_moments, standardize


def build_model(cfg: DictConfig, info: dict[str, Any]) -> nn.Module:
    """Logistic regression (one linear layer, two logits) or a one-hidden-layer MLP."""
    num_features = int(info["num_features"])
    num_classes = int(info.get("num_classes", 2))
    if cfg.task.model == "logreg":
        return nn.Sequential(nn.Linear(num_features, num_classes))
    if cfg.task.model == "mlp":
        hidden = cfg.task.hidden_size
        return nn.Sequential(
            nn.Linear(num_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )
    raise ValueError(f"task.model must be 'logreg' or 'mlp', got '{cfg.task.model}'")


def split_site(
    x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Stratified train/test split; unstratified where a class has fewer than 2 members.

    ``test_fraction``: a share of the rows (float) or a number of rows (int).
    """
    _, counts = np.unique(y, return_counts=True)
    n_test = test_fraction if isinstance(test_fraction, int) else math.ceil(test_fraction * len(y))
    stratify = (y if counts.min() >= 2 and 1 < len(counts) <= min(n_test, len(y) - n_test)
                else None)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=stratify
    )
    return x_train, x_test, y_train, y_test


def make_site(
    name: str, x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int,
    feature_names: list[str], split: tuple[np.ndarray, np.ndarray] | None = None,
    val_fraction: float = 0.0,
) -> SiteData:
    """Split a site's raw rows (``split_site``, or the given (train, test) row indices);
    datasets are filled in after federated standardisation.

    With ``val_fraction`` > 0 that share of the site's rows (one row = one patient) is carved,
    stratified and seeded, out of the training share as a validation split.
    """
    if split is None:
        x_train, x_test, y_train, y_test = split_site(x, y, test_fraction, seed)
    else:
        train, test = split
        x_train, x_test, y_train, y_test = x[train], x[test], y[train], y[test]
    if not 0.0 <= val_fraction < len(y_train) / len(y):
        raise DataError(f"task.val_fraction={val_fraction} must be in [0, the training share "
                        f"{len(y_train) / len(y):.2f})")
    raw = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
    n_val = round(val_fraction * len(y))
    if n_val > 0:
        raw["x_train"], raw["x_val"], raw["y_train"], raw["y_val"] = split_site(
            x_train, y_train, n_val, seed)
    return SiteData(
        name=name,
        train=TensorDataset(torch.empty(0)),
        test=TensorDataset(torch.empty(0)),
        num_classes=2,
        info={"num_features": x.shape[1], "num_classes": 2, "feature_names": feature_names},
        raw=raw,
    )


def local_statistics(site: SiteData) -> dict[str, Any]:
    """Moments of the site's TRAINING rows only (the test rows never shape preprocessing)."""
    return local_moments(site.raw["x_train"])


def apply_statistics(site: SiteData, stats: dict[str, Any] | None) -> SiteData:
    """Standardise (and mean-impute) train, test (and validation) rows with the global
    statistics."""
    if stats is None:
        raise ValueError("tabular tasks need the federated statistics round before training")

    def dataset(x: np.ndarray, y: np.ndarray) -> TensorDataset:
        return TensorDataset(
            torch.from_numpy(standardize(x, stats)), torch.from_numpy(y.astype(np.int64))
        )

    # a new SiteData: the raw site is cached per process and must stay as loaded
    return replace(
        site,
        train=dataset(site.raw["x_train"], site.raw["y_train"]),
        test=dataset(site.raw["x_test"], site.raw["y_test"]),
        val=dataset(site.raw["x_val"], site.raw["y_val"]) if "y_val" in site.raw else None,
    )
