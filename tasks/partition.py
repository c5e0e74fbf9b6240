"""Split one data set into simulated hospitals (sites), deterministically per seed.

Every function returns a list of index arrays, one per site: disjoint, together complete.
"""

from __future__ import annotations

import numpy as np


def iid_partition(num_examples: int, num_sites: int, seed: int) -> list[np.ndarray]:
    """Shuffle and deal the examples evenly across sites."""
    _check_sites(num_examples, num_sites)
    order = np.random.default_rng(seed).permutation(num_examples)
    return [np.sort(part) for part in np.array_split(order, num_sites)]


def dirichlet_partition(
    labels: np.ndarray, num_sites: int, alpha: float, seed: int, min_site_size: int = 10
) -> list[np.ndarray]:
    """Label-skewed split: each class is divided across sites by Dirichlet(alpha) proportions.

    Draws again (up to 100 times, same seeded generator) until every site holds at least
    ``min_site_size`` examples, so no simulated hospital ends up empty.
    """
    labels = np.asarray(labels).reshape(-1)
    _check_sites(len(labels), num_sites)
    if alpha <= 0:
        raise ValueError(f"partition.alpha must be > 0, got {alpha}")
    if min_site_size * num_sites > len(labels):
        raise ValueError(
            f"cannot give {num_sites} sites at least {min_site_size} examples each "
            f"from {len(labels)} examples; lower partition.min_site_size"
        )
    rng = np.random.default_rng(seed)
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(num_sites)]
        for cls in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == cls))
            shares = rng.dirichlet(np.full(num_sites, alpha))
            cuts = (np.cumsum(shares) * len(idx)).astype(int)[:-1]
            for site, chunk in enumerate(np.split(idx, cuts)):
                parts[site].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_site_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise ValueError(
        f"Dirichlet(alpha={alpha}) left a site with fewer than {min_site_size} examples in "
        "100 draws; raise partition.alpha or lower partition.min_site_size"
    )


def partition_indices(labels: np.ndarray, partition_cfg, seed: int) -> list[np.ndarray]:
    """Dispatch on ``partition.name`` (``iid`` or ``dirichlet``)."""
    name = partition_cfg.name
    num_sites = int(partition_cfg.num_sites)
    if name == "iid":
        return iid_partition(len(labels), num_sites, seed)
    if name == "dirichlet":
        return dirichlet_partition(
            labels, num_sites, float(partition_cfg.alpha), seed,
            int(partition_cfg.get("min_site_size", 10)),
        )
    raise ValueError(
        f"partition '{name}' cannot split this data set; use partition=iid or partition=dirichlet"
    )


def _check_sites(num_examples: int, num_sites: int) -> None:
    if num_sites < 1:
        raise ValueError(f"partition.num_sites must be >= 1, got {num_sites}")
    if num_sites > num_examples:
        raise ValueError(f"cannot split {num_examples} examples across {num_sites} sites")
