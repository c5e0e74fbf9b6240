"""Chest X-ray: pneumonia vs normal, pediatric chest radiographs (Kermany et al. 2018).

Data sets (``task.dataset``, files in ``task.data_dir``):
- ``pneumoniamnist`` (default): the full PneumoniaMNIST at 28x28, official split (train 4708,
  test 624), ``pneumoniamnist_full_reconstructed.npz``. No patient ids in the file.
- ``kermany64``: all Kermany images at 64x64 (``kermany_cxr_64.npz``), patient-level split.
- ``kermany128``: a patient-level subset at 128x128 (``kermany_cxr_128_subset.npz``).
  Both Kermany variants take patient ids from ``kermany_cxr_metadata.csv``, so simulated
  hospitals never share a patient.
- ``folder`` / ``dicom``: a hospital's own images (see ``tasks.image_task``).
The PneumoniaMNIST and Kermany files share the same 624 official test images: never train on
one and test on the other. Labels: 0 = normal, 1 = pneumonia. The official val split is not
used (no model selection happens during a federated run).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from tasks.image_task import (
    ImageTaskSpec,
    Relabelled,
    check_labels,
    make_task,
    patient_ids_from_csv,
)

FILES = {
    "pneumoniamnist": "pneumoniamnist_full_reconstructed.npz",
    "kermany64": "kermany_cxr_64.npz",
    "kermany128": "kermany_cxr_128_subset.npz",
}
METADATA = "kermany_cxr_metadata.csv"
INDEX_COLUMNS = {"kermany64": "index_64", "kermany128": "index_128"}
CLASSES = ["normal", "pneumonia"]


def patient_ids(
    data_dir: Path, dataset: str, sizes: dict[str, int]
) -> dict[str, np.ndarray] | None:
    """Kermany variants: patient id per image from the metadata CSV; PneumoniaMNIST: none."""
    if dataset not in INDEX_COLUMNS:
        return None
    return patient_ids_from_csv(data_dir / METADATA, INDEX_COLUMNS[dataset], sizes)


def relabel(labels: np.ndarray, cfg: DictConfig, where: str) -> Relabelled:
    """Keep every image; labels must already be 0 (normal) or 1 (pneumonia)."""
    check_labels(labels, range(len(CLASSES)), where)
    return Relabelled(np.ones(len(labels), dtype=bool), labels.astype(np.int64))


def classes(cfg: DictConfig) -> list[str]:
    """normal, pneumonia."""
    return list(CLASSES)


SPEC = ImageTaskSpec(name="chest_xray", files=FILES, patient_ids=patient_ids,
                     relabel=relabel, classes=classes)
TASK = make_task(SPEC)
