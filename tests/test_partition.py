"""Simulated partitions: deterministic per seed, disjoint, complete; Dirichlet skews labels."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.breast_cancer import _dataset
from tasks.partition import dirichlet_partition, iid_partition


def _check_disjoint_complete(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert len(joined) == n
    assert len(np.unique(joined)) == n


@pytest.mark.parametrize("num_sites", [1, 3, 7])
def test_iid_is_deterministic_disjoint_complete(num_sites: int) -> None:
    a = iid_partition(569, num_sites, seed=1)
    b = iid_partition(569, num_sites, seed=1)
    c = iid_partition(569, num_sites, seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert num_sites == 1 or not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    _check_disjoint_complete(a, 569)
    assert max(map(len, a)) - min(map(len, a)) <= 1


def test_dirichlet_is_deterministic_disjoint_complete_and_skewed() -> None:
    _, y, _ = _dataset()
    a = dirichlet_partition(y, 5, alpha=0.3, seed=3)
    b = dirichlet_partition(y, 5, alpha=0.3, seed=3)
    assert all(np.array_equal(x, z) for x, z in zip(a, b, strict=True))
    _check_disjoint_complete(a, len(y))
    assert min(map(len, a)) >= 10
    malignant_share = [y[p].mean() for p in a]
    assert max(malignant_share) - min(malignant_share) > 0.3  # real label skew


def test_bad_partition_arguments_are_explained() -> None:
    with pytest.raises(ValueError, match="alpha must be > 0"):
        dirichlet_partition(np.zeros(50), 2, alpha=0, seed=0)
    with pytest.raises(ValueError, match="cannot split 3 examples across 5 sites"):
        iid_partition(3, 5, seed=0)
