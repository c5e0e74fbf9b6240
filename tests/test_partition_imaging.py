"""Partitions for imaging: quantity skew, patient-level grouping, patient-level splits.

Patient ids are the real ones of the Kermany chest X-rays and of mini-MIAS.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from tasks.partition import (
    dirichlet_partition,
    grouped_partition,
    partition_indices,
    quantity_skew_partition,
    split_by_patient,
)

CONF = Path(__file__).resolve().parents[1] / "conf" / "partition"


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def kermany_train(shared_data) -> tuple[np.ndarray, np.ndarray]:
    """(labels, patient ids) of the 4719 Kermany training images, in npz order."""
    rows = [r for r in _read(shared_data / "chest_xray" / "kermany_cxr_metadata.csv")
            if r["split"] == "train"]
    rows.sort(key=lambda r: int(r["index_64"]))
    return (np.array([int(r["label"]) for r in rows]),
            np.array([r["patient_id"] for r in rows]))


@pytest.fixture(scope="module")
def mias(shared_data) -> tuple[np.ndarray, np.ndarray]:
    """(labels 0/1/2, patient ids) of all 322 mini-MIAS films."""
    rows = _read(shared_data / "mammography" / "mias_metadata.csv")
    return np.array([int(r["label"]) for r in rows]), np.array([r["patient_id"] for r in rows])


def _cfg(name: str, num_sites: int, **extra):
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    cfg.num_sites = num_sites
    for key, value in extra.items():
        cfg[key] = value
    return cfg


def _assert_disjoint_complete(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert len(joined) == n and len(np.unique(joined)) == n
    assert all(len(p) > 0 for p in parts)


def _sites_per_patient(parts: list[np.ndarray], groups: np.ndarray) -> dict[str, set[int]]:
    where: dict[str, set[int]] = defaultdict(set)
    for site, part in enumerate(parts):
        for i in part:
            where[groups[i]].add(site)
    return where


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


# --------------------------------------------------------------------------- quantity skew


def test_quantity_skew_sizes_are_unequal_but_labels_mixed(kermany_train):
    labels, _ = kermany_train
    parts = quantity_skew_partition(len(labels), 5, alpha=0.5, seed=7)
    assert _same(parts, quantity_skew_partition(len(labels), 5, alpha=0.5, seed=7))
    assert not _same(parts, quantity_skew_partition(len(labels), 5, alpha=0.5, seed=8))
    _assert_disjoint_complete(parts, len(labels))
    sizes = sorted(len(p) for p in parts)
    assert sizes[-1] > 3 * sizes[0]  # quantity skew: the biggest site dwarfs the smallest
    overall = labels.mean()
    for part in parts:
        if len(part) >= 200:  # label mix of a big site stays near the whole set's (IID)
            assert abs(labels[part].mean() - overall) < 0.06


def test_quantity_skew_explicit_sizes_and_no_empty_site():
    parts = quantity_skew_partition(1000, 3, seed=0, sizes=[5, 3, 2])
    assert [len(p) for p in parts] == [500, 300, 200]
    # Even a very skewed draw leaves every site with min_site_size examples.
    for seed in range(20):
        parts = quantity_skew_partition(60, 6, alpha=0.05, seed=seed, min_site_size=3)
        _assert_disjoint_complete(parts, 60)
        assert min(len(p) for p in parts) >= 3
    with pytest.raises(ValueError, match=r"partition\.sizes must be 3 non-negative weights"):
        quantity_skew_partition(100, 3, seed=0, sizes=[1, 2])
    with pytest.raises(ValueError, match="cannot give 4 sites at least 30 examples"):
        quantity_skew_partition(100, 4, seed=0, min_site_size=30)


# --------------------------------------------------------------------------- patient grouping


@pytest.mark.parametrize("name", ["iid", "dirichlet", "quantity"])
def test_grouped_partition_keeps_kermany_patients_together(kermany_train, name):
    labels, groups = kermany_train
    cfg = _cfg(name, 5)
    parts = partition_indices(labels, cfg, 3, groups=groups)
    assert _same(parts, partition_indices(labels, cfg, 3, groups=groups))
    assert not _same(parts, partition_indices(labels, cfg, 4, groups=groups))
    _assert_disjoint_complete(parts, len(labels))
    where = _sites_per_patient(parts, groups)
    assert len(where) == 2561  # patients in the official train split (data README)
    assert all(len(sites) == 1 for sites in where.values())
    # Without grouping, patients with several images do get split across sites.
    loose = partition_indices(labels, cfg, 3)
    assert any(len(s) > 1 for s in _sites_per_patient(loose, groups).values())


def test_dirichlet_half_gives_label_skew_at_patient_level(kermany_train):
    labels, groups = kermany_train
    parts = partition_indices(labels, _cfg("dirichlet", 5, alpha=0.5), 0, groups=groups)
    pneumonia_share = [labels[p].mean() for p in parts]
    assert max(pneumonia_share) - min(pneumonia_share) > 0.3  # overall share is 0.74
    iid = partition_indices(labels, _cfg("iid", 5), 0, groups=groups)
    assert max(labels[p].mean() for p in iid) - min(labels[p].mean() for p in iid) < 0.06


def test_grouped_partition_uses_each_patients_most_severe_label(mias):
    labels, groups = mias
    seen = {}

    def by_label(patient_labels: np.ndarray) -> list[np.ndarray]:
        seen["labels"] = patient_labels.copy()
        return [np.flatnonzero(patient_labels == k) for k in range(3)]

    parts = grouped_partition(groups, labels, by_label)
    _assert_disjoint_complete(parts, len(labels))
    # Independently: a patient's label is the max over its two films.
    worst: dict[str, int] = defaultdict(int)
    for label, patient in zip(labels, groups, strict=True):
        worst[patient] = max(worst[patient], int(label))
    assert np.bincount(seen["labels"]).tolist() == np.bincount(list(worst.values())).tolist()
    for site, part in enumerate(parts):
        assert {worst[groups[i]] for i in part} == {site}
    assert all(len(s) == 1 for s in _sites_per_patient(parts, groups).values())
    # 161 patients, two films each (mdb001 + mdb002 = P001, ...).
    assert len(worst) == 161 and all(np.sum(groups == p) == 2 for p in worst)


def test_grouped_dirichlet_on_mias_and_errors(mias):
    labels, groups = mias
    parts = grouped_partition(
        groups, labels, lambda y: dirichlet_partition(y, 4, alpha=0.5, seed=1, min_site_size=5))
    _assert_disjoint_complete(parts, 322)
    assert all(len(s) == 1 for s in _sites_per_patient(parts, groups).values())
    assert min(len(p) for p in parts) >= 10  # 5 patients = 10 films
    with pytest.raises(ValueError, match="cannot split 161 examples across 200 sites"):
        partition_indices(labels, _cfg("iid", 200), 0, groups=groups)  # 161 patients only
    with pytest.raises(ValueError, match="322 labels but 321 group ids"):
        grouped_partition(groups[:-1], labels, lambda y: [np.arange(len(y))])


def test_partition_indices_keeps_old_signature_and_rejects_unknown(kermany_train):
    labels, _ = kermany_train
    iid = partition_indices(labels, OmegaConf.create({"name": "iid", "num_sites": 4}), 0)
    _assert_disjoint_complete(iid, len(labels))
    with pytest.raises(ValueError, match="partition=quantity"):
        partition_indices(labels, OmegaConf.create({"name": "natural", "num_sites": 4}), 0)


# --------------------------------------------------------------------------- patient-level split


def test_split_by_patient_on_mias(mias):
    labels, groups = mias
    parts = split_by_patient(groups, labels, 0.1, 0.2, seed=42)
    assert all(np.array_equal(parts[k], v) for k, v in
               split_by_patient(groups, labels, 0.1, 0.2, seed=42).items())
    _assert_disjoint_complete(list(parts.values()), 322)
    patients = {k: set(groups[v]) for k, v in parts.items()}
    assert not (patients["train"] & patients["test"]) and not (patients["val"] & patients["test"])
    assert not (patients["train"] & patients["val"])
    # Per patient label: round(0.1 n) val and round(0.2 n) test patients, as for the shipped
    # split: 161 patients -> 16 val, 32 test, 113 train.
    assert [len(patients[k]) for k in ("train", "val", "test")] == [113, 16, 32]
    with pytest.raises(ValueError, match="sum to less than 1"):
        split_by_patient(groups, labels, 0.5, 0.5, seed=0)
