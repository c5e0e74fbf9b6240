"""Breast Cancer Wisconsin (Diagnostic), shipped with scikit-learn: the embedded default.

569 patients, 30 features from digitised fine-needle aspirates; target 1 = malignant.
Split across simulated hospitals by ``partition`` (IID or Dirichlet label skew).
"""

from __future__ import annotations

from functools import cache

import numpy as np
from omegaconf import DictConfig
from sklearn.datasets import load_breast_cancer

from tasks import tabular
from tasks.base import DataError, SiteData, SiteRef, Task
from tasks.partition import partition_indices


@cache
def _dataset() -> tuple[np.ndarray, np.ndarray, list[str]]:
    data = load_breast_cancer()
    # scikit-learn codes 0 = malignant, 1 = benign; we predict disease, so 1 = malignant.
    return data.data.astype(np.float64), (1 - data.target).astype(np.int64), list(
        data.feature_names
    )


def site_names(cfg: DictConfig) -> list[str]:
    """``site-0`` .. ``site-{N-1}`` for ``partition.num_sites`` simulated hospitals."""
    if cfg.partition.num_sites is None:
        raise DataError("breast_cancer has no natural sites: use partition=iid or dirichlet")
    return [f"site-{i}" for i in range(cfg.partition.num_sites)]


def load_site(cfg: DictConfig, site: SiteRef) -> SiteData:
    """One simulated hospital's rows, split per site into train and test."""
    if site.index is None:
        raise DataError(
            "breast_cancer is a simulated partition: it needs a partition-id "
            "(simulation), not a data-path"
        )
    x, y, names = _dataset()
    parts = partition_indices(y, cfg.partition, cfg.seed)
    idx = parts[site.index]
    return tabular.make_site(
        site.name, x[idx], y[idx], cfg.task.test_fraction, cfg.seed, names,
        val_fraction=float(cfg.task.get("val_fraction", 0.0)),
    )


TASK = Task(
    name="breast_cancer",
    site_names=site_names,
    load_site=load_site,
    build_model=tabular.build_model,
    local_statistics=tabular.local_statistics,
    apply_statistics=tabular.apply_statistics,
)
