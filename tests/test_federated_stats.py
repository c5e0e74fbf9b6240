"""Federated statistics equal the pooled statistics of the same rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from tasks.breast_cancer import _dataset
from tasks.federated_stats import combine_moments, local_moments, standardize
from tasks.heart_disease import SITE_FILES, encode, read_site_file


def _assert_matches_pooled(parts: list[np.ndarray]) -> None:
    combined = combine_moments([local_moments(p) for p in parts])
    pooled = np.concatenate(parts)
    np.testing.assert_allclose(combined["mean"], np.nanmean(pooled, axis=0), rtol=0, atol=1e-9)
    np.testing.assert_allclose(combined["var"], np.nanvar(pooled, axis=0), rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(combined["count"], (~np.isnan(pooled)).sum(axis=0))


@pytest.mark.parametrize("protocol", ["flamby_sizes", "impute"])
def test_heart_disease_sites_give_the_pooled_moments(shared_data: Path, protocol: str) -> None:
    folder = shared_data / "heart_disease"
    parts = [encode(read_site_file(folder / f), protocol)[0] for f in SITE_FILES.values()]
    assert any(np.isnan(p).any() for p in parts)  # missing values are really exercised
    _assert_matches_pooled(parts)


def test_breast_cancer_uneven_sites_give_the_pooled_moments() -> None:
    x, _, _ = _dataset()
    _assert_matches_pooled(np.split(x, [13, 200, 201]))


def test_standardize_centres_scales_and_imputes() -> None:
    x = np.array([[1.0, 5.0], [3.0, np.nan], [5.0, 5.0]])
    stats = combine_moments([local_moments(x)])
    z = standardize(x, stats)
    np.testing.assert_allclose(z[:, 0], [-1.2247449, 0.0, 1.2247449], atol=1e-6)
    np.testing.assert_array_equal(z[:, 1], [0.0, 0.0, 0.0])  # constant + missing -> 0


def test_sites_standardise_with_global_not_local_statistics(shared_data: Path) -> None:
    from tasks.base import SiteRef
    from tasks.heart_disease import TASK

    cfg = OmegaConf.create(
        {
            "task": {
                "data_dir": str(shared_data / "heart_disease"),
                "protocol": "flamby",
                "test_fraction": 0.34,
                "split_seed": None,
            }
        }
    )
    sites = [TASK.load_site(cfg, SiteRef(name, index=i)) for i, name in enumerate(SITE_FILES)]
    stats = combine_moments([TASK.local_statistics(s) for s in sites])
    swiss = TASK.apply_statistics(sites[2], stats)
    x = swiss.train.tensors[0].numpy()
    # Switzerland alone is far from the federation's mean age: its own mean is not 0.
    assert abs(x[:, 0].mean()) > 0.1
