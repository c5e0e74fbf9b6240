"""Mammography on mini-MIAS (Suckling et al. 1994): 322 film mammograms of 161 patients.

Data sets (``task.dataset``): ``mias128`` (default, ``mias_128.npz``), ``mias256``
(``mias_256.npz``) and ``mias512`` (``mias_512.npz``), whole films resized by block averaging,
with the file's patient-level split (train 226 / val 32 / test 64 images); patient ids come
from ``mias_metadata.csv``, so a patient's two films always stay at one simulated hospital.
``folder`` / ``dicom``: a hospital's own films (labels coded normal / benign / malignant,
``task.classes``).

Raw labels: 0 = normal, 1 = benign, 2 = malignant (the most severe finding on the film).
Views (``task.view``): ``film`` (one prediction per whole film) or ``patch`` (lesion-centred
and normal-tissue windows, film-level scores by a sliding window: ``tasks.mammography_patches``).

Targets (``task.target``):
- ``abnormal``: normal (0) vs abnormal (1 = benign or malignant), all films;
- ``malignancy``: benign (0) vs malignant (1), abnormal films only (80 train / 23 test).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from tasks.base import DataError, SiteData, SiteRef, Task
from tasks.image_task import (
    ImageTaskSpec,
    Relabelled,
    check_labels,
    load_image_site,
    make_task,
    metadata_column,
    patient_ids_from_csv,
)
from tasks.mammography_patches import load_patch_site, patch_metrics

FILES = {"mias128": "mias_128.npz", "mias256": "mias_256.npz", "mias512": "mias_512.npz"}
VIEWS = ("film", "patch")
METADATA = "mias_metadata.csv"
RAW_CLASSES = ("normal", "benign", "malignant")
TARGETS = {"abnormal": ["normal", "abnormal"], "malignancy": ["benign", "malignant"]}


def patient_ids(
    data_dir: Path, dataset: str, sizes: dict[str, int]
) -> dict[str, np.ndarray] | None:
    """Patient id of every film (P001..P161) from the metadata CSV."""
    if dataset not in FILES:
        return None
    return patient_ids_from_csv(data_dir / METADATA, "index_in_split", sizes)


def laterality_flips(
    data_dir: Path, dataset: str, sizes: dict[str, int], cfg: DictConfig
) -> dict[str, np.ndarray] | None:
    """With ``task.align_laterality``: flip every right-breast film (``laterality`` R in the
    metadata) so that all breasts face the same way, as left films do.

    Why: left and right films face opposite directions, and in mini-MIAS's split laterality is
    confounded with the label (train: 43% of right films abnormal vs 27% of left; test: 19% vs
    53%), so a network that can see the orientation learns a shortcut that inverts on the test
    split.
    """
    if dataset not in FILES or not cfg.task.get("align_laterality", False):
        return None
    sides = metadata_column(data_dir / METADATA, "laterality", sizes)
    bad = {split: sorted(set(v) - {"L", "R"}) for split, v in sides.items()}
    if any(bad.values()):
        raise DataError(f"{data_dir / METADATA}: laterality must be L or R, found {bad}")
    return {split: values == "R" for split, values in sides.items()}


def _target(cfg: DictConfig) -> str:
    target = cfg.task.target
    if target not in TARGETS:
        raise DataError(f"task.target must be one of {', '.join(TARGETS)}, got '{target}'")
    return target


def relabel(labels: np.ndarray, cfg: DictConfig, where: str) -> Relabelled:
    """Map normal/benign/malignant to the configured binary target."""
    check_labels(labels, range(len(RAW_CLASSES)), where)
    if _target(cfg) == "abnormal":
        return Relabelled(np.ones(len(labels), dtype=bool), (labels > 0).astype(np.int64))
    keep = labels > 0
    return Relabelled(keep, (labels[keep] == 2).astype(np.int64))


def classes(cfg: DictConfig) -> list[str]:
    """The target's two classes."""
    return list(TARGETS[_target(cfg)])


def extra_info(cfg: DictConfig) -> dict[str, str]:
    """Which target and view the sites trained on (shown in sites.json)."""
    return {"target": _target(cfg), "view": _view(cfg)}


def _view(cfg: DictConfig) -> str:
    view = str(cfg.task.get("view", "film"))
    if view not in VIEWS:
        raise DataError(f"task.view must be one of {', '.join(VIEWS)}, got '{view}'")
    return view


def load_site(cfg: DictConfig, site: SiteRef) -> SiteData:
    """Whole films (``task.view=film``) or lesion / normal-tissue patches (``patch``)."""
    if _view(cfg) == "patch":
        return load_patch_site(SPEC, cfg, site)
    return load_image_site(SPEC, cfg, site)


SPEC = ImageTaskSpec(name="mammography", files=FILES, patient_ids=patient_ids,
                     relabel=relabel, classes=classes, extra_info=extra_info,
                     flips=laterality_flips)
TASK = Task(**{**make_task(SPEC).__dict__, "load_site": load_site,
                "extra_metrics": patch_metrics})
