"""Split one data set into simulated hospitals (sites), deterministically per seed.

Every function returns a list of index arrays, one per site: disjoint, together complete.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

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


def quantity_skew_partition(
    num_examples: int,
    num_sites: int,
    alpha: float = 1.0,
    seed: int = 0,
    *,
    sizes: Sequence[float] | None = None,
    min_site_size: int = 1,
) -> list[np.ndarray]:
    """Quantity skew: sites of unequal size, labels mixed as in the whole data set.

    Site shares are drawn from Dirichlet(alpha) (smaller alpha = more unequal), or given
    explicitly by ``sizes`` (relative weights, e.g. ``[5, 3, 2]``). Every site first gets
    ``min_site_size`` examples (so none is empty); the rest is dealt by the shares with the
    largest-remainder rule, then a seeded shuffle decides which examples go where.
    """
    _check_sites(num_examples, num_sites)
    if min_site_size < 1:
        raise ValueError(f"partition.min_site_size must be >= 1, got {min_site_size}")
    if min_site_size * num_sites > num_examples:
        raise ValueError(
            f"cannot give {num_sites} sites at least {min_site_size} examples each "
            f"from {num_examples} examples; lower partition.min_site_size"
        )
    rng = np.random.default_rng(seed)
    if sizes is not None:
        shares = np.asarray(sizes, dtype=np.float64)
        if shares.shape != (num_sites,) or (shares < 0).any() or shares.sum() <= 0:
            raise ValueError(
                f"partition.sizes must be {num_sites} non-negative weights, got {list(sizes)}"
            )
        shares = shares / shares.sum()
    else:
        if alpha <= 0:
            raise ValueError(f"partition.alpha must be > 0, got {alpha}")
        shares = rng.dirichlet(np.full(num_sites, alpha))
    spare = num_examples - min_site_size * num_sites
    exact = shares * spare
    counts = np.floor(exact).astype(np.int64)
    # Largest remainder: the examples left by flooring go to the largest fractional parts.
    leftover = spare - int(counts.sum())
    counts[np.argsort(-(exact - counts), kind="stable")[:leftover]] += 1
    counts += min_site_size
    order = rng.permutation(num_examples)
    return [np.sort(part) for part in np.split(order, np.cumsum(counts)[:-1])]


def grouped_partition(
    groups: Sequence[str],
    labels: np.ndarray | None,
    base_partition: Callable[[np.ndarray], list[np.ndarray]],
) -> list[np.ndarray]:
    """Partition whole groups (patients) instead of examples, so no group spans two sites.

    ``base_partition`` receives one label per unique group (sorted by group id) and returns
    the group indices of each site, e.g. ``lambda y: dirichlet_partition(y, 5, 0.5, seed)``.
    A group's label is the maximum label of its examples (for binary or ordinal labels such as
    normal < benign < malignant: the patient's most severe finding). Returns example indices.
    """
    groups = np.asarray([str(g) for g in groups])
    unique, inverse = np.unique(groups, return_inverse=True)
    if labels is None:
        group_labels = np.zeros(len(unique), dtype=np.int64)
    else:
        labels = np.asarray(labels).reshape(-1).astype(np.int64)
        if len(labels) != len(groups):
            raise ValueError(f"{len(labels)} labels but {len(groups)} group ids")
        group_labels = np.full(len(unique), np.iinfo(np.int64).min, dtype=np.int64)
        np.maximum.at(group_labels, inverse, labels)
    site_of_group = np.full(len(unique), -1, dtype=np.int64)
    group_parts = base_partition(group_labels)
    for site, part in enumerate(group_parts):
        site_of_group[np.asarray(part, dtype=np.int64)] = site
    if (site_of_group < 0).any():
        raise ValueError("base partition left some groups without a site")
    site_of_example = site_of_group[inverse]
    return [np.flatnonzero(site_of_example == site) for site in range(len(group_parts))]


def split_by_patient(
    groups: Sequence[str],
    labels: np.ndarray,
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> dict[str, np.ndarray]:
    """Patient-level, label-stratified train/val/test split (example indices per split).

    Each patient gets the maximum label of its images. For each patient label in ascending
    order the sorted patient list is shuffled with one seeded generator; the first
    round(val_fraction * n) patients go to val, the next round(test_fraction * n) to test, the
    rest to train (the rule used for the shipped mini-MIAS split). No patient is in two splits.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            f"val_fraction={val_fraction} and test_fraction={test_fraction} must be in [0, 1) "
            "and sum to less than 1"
        )
    groups = np.asarray([str(g) for g in groups])
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    unique, inverse = np.unique(groups, return_inverse=True)
    group_labels = np.full(len(unique), np.iinfo(np.int64).min, dtype=np.int64)
    np.maximum.at(group_labels, inverse, labels)
    rng = np.random.default_rng(seed)
    split_of_group = np.empty(len(unique), dtype=object)
    for label in np.unique(group_labels):
        members = rng.permutation(np.flatnonzero(group_labels == label))
        n_val = round(val_fraction * len(members))
        n_test = round(test_fraction * len(members))
        split_of_group[members[:n_val]] = "val"
        split_of_group[members[n_val:n_val + n_test]] = "test"
        split_of_group[members[n_val + n_test:]] = "train"
    split_of_example = split_of_group[inverse]
    return {
        split: np.flatnonzero(split_of_example == split) for split in ("train", "val", "test")
    }


def partition_indices(
    labels: np.ndarray,
    partition_cfg,
    seed: int,
    groups: Sequence[str] | None = None,
) -> list[np.ndarray]:
    """Dispatch on ``partition.name`` (``iid``, ``dirichlet`` or ``quantity``).

    With ``groups`` (one patient id per example) whole patients are partitioned
    (``grouped_partition``): no patient's images end up in two sites. Sizes such as
    ``min_site_size`` then count patients.
    """
    name = partition_cfg.name
    num_sites = partition_cfg.num_sites

    def split(unit_labels: np.ndarray) -> list[np.ndarray]:
        if name == "iid":
            return iid_partition(len(unit_labels), num_sites, seed)
        if name == "dirichlet":
            return dirichlet_partition(
                unit_labels, num_sites, partition_cfg.alpha, seed,
                partition_cfg.get("min_site_size", 10),
            )
        if name == "quantity":
            sizes = partition_cfg.get("sizes")
            return quantity_skew_partition(
                len(unit_labels), num_sites, partition_cfg.get("alpha", 1.0), seed,
                sizes=list(sizes) if sizes is not None else None,
                min_site_size=partition_cfg.get("min_site_size", 1),
            )
        raise ValueError(
            f"partition '{name}' cannot split this data set; use partition=iid, "
            "partition=dirichlet or partition=quantity"
        )

    if groups is None:
        return split(np.asarray(labels).reshape(-1))
    return grouped_partition(groups, labels, split)


def _check_sites(num_examples: int, num_sites: int) -> None:
    if num_sites < 1:
        raise ValueError(f"partition.num_sites must be >= 1, got {num_sites}")
    if num_sites > num_examples:
        raise ValueError(f"cannot split {num_examples} examples across {num_sites} sites")
