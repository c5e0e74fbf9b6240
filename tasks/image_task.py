"""Shared plumbing of the imaging tasks: data set variants, simulated hospitals, site data.

An imaging task (``tasks.chest_xray``, ``tasks.mammography``) is an ``ImageTaskSpec``: its
npz variants, how to find patient ids, and how raw labels map to the task's target. From it
``make_task`` builds the ``Task`` the Flower glue runs.

Where a site's data comes from:
- simulation (``SiteRef.index``): the variant ``task.dataset`` in ``task.data_dir``. The
  official TRAIN split is partitioned across ``partition.num_sites`` simulated hospitals by
  ``partition`` (patient-level where the data has patient ids); the official TEST split is
  dealt to the same sites so that each site gets, per class, the same share of the test
  images as it holds of the training images. Pooled test metrics are therefore over the whole
  official test split, and each site's test set looks like its own population.
- deployment (``SiteRef.data_path`` from the SuperNode's node_config): the hospital's own
  MedMNIST-layout ``.npz`` (e.g. made by the conversion script) or its folder of images
  (PNG/JPEG/DICOM with a manifest or class sub-folders).
- ``task.dataset=folder`` / ``dicom`` in simulation: a folder (``task.data_dir``) as above,
  then partitioned like an npz variant.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig
from sklearn.model_selection import GroupShuffleSplit, train_test_split

from tasks.base import DataError, SiteData, SiteRef, Task
from tasks.data_checks import check_image_source
from tasks.image_data import load_folder, load_npz
from tasks.image_models import build_image_model
from tasks.image_transforms import ImageDataset, augmentation, prepare_images
from tasks.partition import partition_indices

FOLDER_DATASETS = ("folder", "dicom")


@dataclass(frozen=True)
class ImageSplits:
    """Official train and test splits of one data set (raw labels, optional patient ids)."""

    source: str  # file or folder, for messages
    train_images: np.ndarray  # (N, H, W): uint8, or float32 in [0, 1] (folders)
    train_labels: np.ndarray  # int64 (N,)
    test_images: np.ndarray
    test_labels: np.ndarray
    train_groups: np.ndarray | None = None  # patient id per image
    test_groups: np.ndarray | None = None


@dataclass(frozen=True)
class Relabelled:
    """The images a task keeps and their target labels."""

    keep: np.ndarray  # bool mask over the split
    labels: np.ndarray  # int64 target labels of the kept images


@dataclass(frozen=True)
class ImageTaskSpec:
    """What distinguishes one imaging task from another."""

    name: str
    # dataset variant -> npz file name inside task.data_dir
    files: dict[str, str]
    # (data_dir, variant) -> patient ids per split ("train"/"test"), or None
    patient_ids: Callable[[Path, str, dict[str, int]], dict[str, np.ndarray] | None]
    # raw labels of one split -> kept images and target labels (validates the raw labels)
    relabel: Callable[[np.ndarray, DictConfig, str], Relabelled]
    # the target's class names for this config
    classes: Callable[[DictConfig], list[str]]
    extra_info: Callable[[DictConfig], dict[str, Any]] = field(default=lambda cfg: {})
    # (data_dir, variant, split sizes, cfg) -> per split, which images to flip left-right
    # (e.g. to make every breast face the same way), or None
    flips: Callable[[Path, str, dict[str, int], DictConfig], dict[str, np.ndarray] | None] = (
        field(default=lambda data_dir, dataset, sizes, cfg: None)
    )


# --------------------------------------------------------------------------- loading


def _data_dir(cfg: DictConfig) -> Path:
    if not cfg.task.data_dir:
        raise DataError(
            f"task.data_dir is not set: give the folder holding the {cfg.task.name} data, e.g. "
            f"task.data_dir=/abs/path/to/shared/data/{cfg.task.name}"
        )
    folder = Path(cfg.task.data_dir).expanduser()
    if not folder.is_dir():
        raise DataError(f"task.data_dir '{cfg.task.data_dir}' is not a folder "
                        f"(resolved to {folder.resolve()})")
    return folder


def _image_size(cfg: DictConfig) -> int | None:
    size = cfg.task.get("image_size")
    return None if size is None else int(size)


@lru_cache(maxsize=4)
def _npz_splits(path: Path) -> ImageSplits:
    data = load_npz(path)
    return ImageSplits(str(path), data["train_images"], data["train_labels"],
                       data["test_images"], data["test_labels"])


@lru_cache(maxsize=4)
def _folder_splits(
    folder: Path, classes: tuple[str, ...] | None, size: int | None, test_fraction: float,
    seed: int,
) -> ImageSplits:
    """A folder of images -> train/test: the manifest's ``split`` column, else a seeded
    patient-level (or, without patient ids, stratified) split of ``test_fraction``."""
    images = load_folder(folder, classes=list(classes) if classes else None, size=size)
    pixels, labels = images.images[:, 0], images.labels
    groups = np.asarray(images.patient_ids) if images.patient_ids else None
    if images.splits is not None:
        splits = np.asarray(images.splits)
        train, test = np.flatnonzero(splits == "train"), np.flatnonzero(splits == "test")
        if len(train) == 0 or len(test) == 0:
            raise DataError(f"{folder}: the manifest's split column needs both 'train' and "
                            "'test' rows (or drop the column for a seeded split)")
    elif groups is not None:
        splitter = GroupShuffleSplit(n_splits=1, test_size=test_fraction, random_state=seed)
        train, test = next(splitter.split(pixels, labels, groups))
    else:
        _, counts = np.unique(labels, return_counts=True)
        stratify = labels if counts.min() >= 2 else None
        train, test = train_test_split(np.arange(len(labels)), test_size=test_fraction,
                                       random_state=seed, stratify=stratify)
    return ImageSplits(
        str(folder), pixels[train], labels[train], pixels[test], labels[test],
        None if groups is None else groups[train], None if groups is None else groups[test],
    )


def load_splits(spec: ImageTaskSpec, cfg: DictConfig, path: Path | None = None) -> ImageSplits:
    """The data set of this config (or the hospital's own ``path``), labels as in the file."""
    if path is None:
        dataset = cfg.task.dataset
        folder = _data_dir(cfg)
        if dataset in FOLDER_DATASETS:
            return _own_splits(cfg, folder)
        if dataset not in spec.files:
            raise DataError(
                f"task.dataset '{dataset}' is not a {spec.name} data set; choose one of "
                f"{', '.join([*spec.files, *FOLDER_DATASETS])}"
            )
        file = folder / spec.files[dataset]
        splits = _npz_splits(file)
        sizes = {"train": len(splits.train_labels), "test": len(splits.test_labels)}
        ids = spec.patient_ids(folder, dataset, sizes) or {"train": None, "test": None}
        flips = spec.flips(folder, dataset, sizes, cfg) or {}
        return ImageSplits(
            splits.source, _flipped(splits.train_images, flips.get("train")),
            splits.train_labels, _flipped(splits.test_images, flips.get("test")),
            splits.test_labels, ids["train"], ids["test"],
        )
    return _own_splits(cfg, path)


def _flipped(images: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """A copy of ``images`` with the ``mask``ed ones flipped left-right (cached arrays stay)."""
    if mask is None or not mask.any():
        return images
    out = images.copy()
    out[mask] = out[mask][:, :, ::-1]
    return out


def _own_splits(cfg: DictConfig, path: Path) -> ImageSplits:
    if path.is_file():
        if path.suffix.lower() != ".npz":
            raise DataError(f"{path}: a site's data must be a MedMNIST-layout .npz file or a "
                            "folder of images")
        return _npz_splits(path)
    classes = cfg.task.get("classes")
    return _folder_splits(
        path, tuple(str(c) for c in classes) if classes else None, _image_size(cfg),
        cfg.task.get("test_fraction", 0.2), cfg.seed,
    )


# --------------------------------------------------------------------------- sites


def site_names(cfg: DictConfig) -> list[str]:
    """``site-0`` .. ``site-{N-1}`` for ``partition.num_sites`` simulated hospitals."""
    num_sites = cfg.partition.get("num_sites")
    if num_sites is None:
        raise DataError(f"{cfg.task.name} has no natural sites: set partition.num_sites "
                        "(or run one simulated hospital per SuperNode)")
    return [f"site-{i}" for i in range(int(num_sites))]


def matched_split(
    labels: np.ndarray, reference: list[np.ndarray], seed: int,
    groups: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Deal examples to sites so each site's share of every class follows ``reference``.

    ``reference[s]`` holds site ``s``'s (training) labels: site ``s`` receives about
    ``count_s(c) / sum_t count_t(c)`` of the class-``c`` examples (a class no site trains on
    is dealt by site size). With ``groups`` whole groups (patients) are dealt, a group
    counting as its highest label. Returns one sorted index array per site: disjoint and
    together complete; deterministic per seed.
    """
    labels = np.asarray(labels).reshape(-1)
    num_sites = len(reference)
    rng = np.random.default_rng(seed)
    keys = np.arange(len(labels)) if groups is None else np.asarray(groups)
    unique, inverse = np.unique(keys, return_inverse=True)
    group_label = np.zeros(len(unique), dtype=np.int64)
    np.maximum.at(group_label, inverse, labels)
    group_size = np.bincount(inverse, minlength=len(unique))
    sizes = np.array([len(r) for r in reference], dtype=float)
    site_of_group = np.zeros(len(unique), dtype=np.int64)
    for cls in np.unique(group_label):
        counts = np.array([np.sum(np.asarray(r) == cls) for r in reference], dtype=float)
        shares = counts if counts.sum() > 0 else sizes
        members = rng.permutation(np.flatnonzero(group_label == cls))
        ends = np.cumsum(group_size[members])
        middles = ends - group_size[members] / 2.0
        bounds = np.cumsum(shares / shares.sum()) * ends[-1]
        site_of_group[members] = np.minimum(np.searchsorted(bounds, middles, side="right"),
                                            num_sites - 1)
    site_of_example = site_of_group[inverse]
    return [np.flatnonzero(site_of_example == s) for s in range(num_sites)]


def simulated_parts(
    spec: ImageTaskSpec, cfg: DictConfig
) -> tuple[ImageSplits, Relabelled, Relabelled, list[np.ndarray], list[np.ndarray]]:
    """The data set, its relabelling, and each simulated site's train and test indices.

    Indices refer to the KEPT images of each split (after ``spec.relabel``).
    """
    splits = load_splits(spec, cfg)
    train = spec.relabel(splits.train_labels, cfg, f"{splits.source} (train)")
    test = spec.relabel(splits.test_labels, cfg, f"{splits.source} (test)")
    seed = cfg.seed
    train_groups = None if splits.train_groups is None else splits.train_groups[train.keep]
    test_groups = None if splits.test_groups is None else splits.test_groups[test.keep]
    extra = {} if train_groups is None else {"groups": train_groups}
    train_parts = partition_indices(train.labels, cfg.partition, seed, **extra)
    test_parts = matched_split(test.labels, [train.labels[p] for p in train_parts], seed + 1,
                               test_groups)
    return splits, train, test, train_parts, test_parts


def load_image_site(spec: ImageTaskSpec, cfg: DictConfig, site: SiteRef) -> SiteData:
    """One site's prepared train and test data (see the module docstring for the sources)."""
    if site.data_path is not None:
        splits = load_splits(spec, cfg, Path(site.data_path))
        train = spec.relabel(splits.train_labels, cfg, f"{splits.source} (train)")
        test = spec.relabel(splits.test_labels, cfg, f"{splits.source} (test)")
        train_idx, test_idx = np.arange(len(train.labels)), np.arange(len(test.labels))
        index = 0
    else:
        if site.index is None:
            raise DataError(f"site {site.name} has neither a partition-id nor a data-path")
        splits, train, test, train_parts, test_parts = simulated_parts(spec, cfg)
        index = site.index
        if index >= len(train_parts):
            raise DataError(f"site index {index} is outside the {len(train_parts)} sites of "
                            "partition.num_sites")
        train_idx, test_idx = train_parts[index], test_parts[index]
    x_train = splits.train_images[train.keep][train_idx]
    x_test = splits.test_images[test.keep][test_idx]
    return make_site(spec, cfg, site.name, x_train, train.labels[train_idx],
                     x_test, test.labels[test_idx], augment_seed=cfg.seed + 1000 * index)


def make_site(
    spec: ImageTaskSpec, cfg: DictConfig, name: str, x_train: np.ndarray, y_train: np.ndarray,
    x_test: np.ndarray, y_test: np.ndarray, augment_seed: int,
) -> SiteData:
    """Prepare (scale, resize) a site's images once and wrap them as datasets."""
    train_images = prepare_images(x_train, _image_size(cfg))
    test_images = prepare_images(x_test, _image_size(cfg))
    size = int(train_images.shape[-1])
    classes = spec.classes(cfg)
    transform = augmentation(cfg.task.get("augment"), size, augment_seed)
    info = {
        "in_channels": 1,
        "image_size": size,
        "num_classes": len(classes),
        "classes": classes,
        "dataset": cfg.task.dataset,
        "train_class_counts": np.bincount(y_train, minlength=len(classes)).tolist(),
        "test_class_counts": np.bincount(y_test, minlength=len(classes)).tolist(),
        **spec.extra_info(cfg),
    }
    return SiteData(
        name=name,
        train=ImageDataset(train_images, y_train, transform),
        test=ImageDataset(test_images, y_test),
        num_classes=len(classes),
        info=info,
    )


def make_task(spec: ImageTaskSpec) -> Task:
    """The ``Task`` for an imaging spec."""

    def load_site(cfg: DictConfig, site: SiteRef) -> SiteData:
        return load_image_site(spec, cfg, site)

    return Task(name=spec.name, site_names=site_names, load_site=load_site,
                build_model=build_image_model, check_data_path=check_image_source)


def check_labels(labels: np.ndarray, allowed: range, where: str) -> None:
    """DataError naming ``where`` if a raw label is outside ``allowed``."""
    bad = sorted(set(np.unique(labels).tolist()) - set(allowed))
    if bad:
        raise DataError(f"{where}: labels {bad} are outside the classes "
                        f"{list(allowed)} this task expects")


def patient_ids_from_csv(
    path: Path, index_column: str, sizes: dict[str, int]
) -> dict[str, np.ndarray]:
    """Patient id of every image, per split, from a metadata CSV (see ``metadata_column``)."""
    return metadata_column(path, "patient_id", sizes, index_column)


def metadata_column(
    path: Path, column: str, sizes: dict[str, int], index_column: str = "index_in_split"
) -> dict[str, np.ndarray]:
    """One metadata value per image, per split (string arrays in npz order).

    The CSV needs columns ``split``, ``column`` and ``index_column`` (the image's row in
    that split's npz arrays; -1 = not in this file). Raises DataError naming the file when a
    column is missing or the rows do not cover each split's images exactly once.
    """
    import csv

    if not path.is_file():
        raise DataError(f"{path}: metadata CSV does not exist (needed for '{column}')")
    values = {split: np.full(n, None, dtype=object) for split, n in sizes.items()}
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = {"split", column, index_column} - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
        for row in reader:
            split, index = row["split"], int(row[index_column])
            if split not in values or index < 0:
                continue
            if index >= sizes[split] or values[split][index] is not None:
                raise DataError(f"{path}, line {reader.line_num}: {index_column}={index} does "
                                f"not fit the {sizes[split]} {split} images of the npz")
            values[split][index] = row[column]
    for split, found in values.items():
        unlisted = sum(v is None for v in found)
        if unlisted:
            raise DataError(f"{path}: {unlisted} {split} images have no row (the metadata "
                            "does not match the npz)")
    return {split: found.astype(str) for split, found in values.items()}
