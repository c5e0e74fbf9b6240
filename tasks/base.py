"""The Task contract: what a medical task provides to the Flower glue.

A task is one module exposing a ``TASK`` object. Adding a task = one module + one yaml in
``conf/task/``; nothing else changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import Dataset


class DataError(ValueError):
    """Site data that cannot be used, with a message naming the file (and line) at fault."""


@dataclass(frozen=True)
class SiteRef:
    """Which site a ClientApp serves and where its data is.

    In simulation ``index`` comes from the SuperNode's partition-id; in deployment the
    SuperNode's node_config gives ``name`` (site-name) and ``data_path`` (data-path).
    """

    name: str
    index: int | None = None
    data_path: Path | None = None


@dataclass
class SiteData:
    """One site's local data, ready for training: train, test (and validation) datasets."""

    name: str
    train: Dataset
    test: Dataset
    num_classes: int
    # Task-specific facts the server needs to build the model (e.g. num_features).
    info: dict[str, Any] = field(default_factory=dict)
    # Raw arrays that still need federated preprocessing (tabular tasks).
    raw: dict[str, Any] = field(default_factory=dict)
    # Validation split (patient-disjoint from train and test), e.g. for choosing the
    # operating threshold; None when the task has none.
    val: Dataset | None = None
    # Site-local objects only the task's own hooks use (never sent anywhere): e.g. patient
    # ids per split, whole test films for film-level scores.
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def num_train(self) -> int:
        """Number of training examples (the FedAvg weight)."""
        return len(self.raw["y_train"]) if "y_train" in self.raw else len(self.train)

    @property
    def num_test(self) -> int:
        """Number of test examples."""
        return len(self.raw["y_test"]) if "y_test" in self.raw else len(self.test)


def _no_statistics(site: SiteData) -> dict[str, Any] | None:
    return None


def _keep(site: SiteData, stats: dict[str, Any] | None) -> SiteData:
    return site


@dataclass(frozen=True)
class Task:
    """A medical task: data for one site, model builder, optional federated preprocessing."""

    name: str
    # All site names of the task for this config (natural sites or site-0..site-N-1).
    site_names: Callable[[DictConfig], list[str]]
    # Load one site's data (raw, before federated preprocessing).
    load_site: Callable[[DictConfig, SiteRef], SiteData]
    # Build the model from the config and the facts sites reported (``SiteData.info``).
    build_model: Callable[[DictConfig, dict[str, Any]], nn.Module]
    # Per-site sufficient statistics for federated preprocessing (None: nothing to share).
    local_statistics: Callable[[SiteData], dict[str, Any] | None] = _no_statistics
    # Apply the combined (global) statistics to a site's data.
    apply_statistics: Callable[[SiteData, dict[str, Any] | None], SiteData] = _keep
    # Whether the task's sites are real (natural) rather than a simulated partition.
    natural_sites: bool = False
    # Cheap check (path, site name) that a SuperNode's data-path holds this task's kind of
    # data, run before loading; raises DataError (see tasks.data_checks). None: no check.
    check_data_path: Callable[[Path, str], None] | None = None
    # Extra test metrics of a model on a site beyond the per-example ones (e.g. film-level
    # scores of a patch model), merged into the site's evaluation reply. None: none.
    extra_metrics: Callable[[nn.Module, SiteData, torch.device], dict[str, Any]] | None = None


def pick_device(requested: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; anything else is passed to torch."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)
