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
import torch
from omegaconf import DictConfig
from sklearn.model_selection import GroupShuffleSplit, train_test_split

from tasks.base import DataError, SiteData, SiteRef, Task
from tasks.data_checks import check_image_source
from tasks.image_data import SPLITS, load_folder, load_npz
from tasks.image_models import build_image_model
from tasks.image_transforms import ImageDataset, augmentation, prepare_images
from tasks.partition import partition_indices, split_by_patient

FOLDER_DATASETS = ("folder", "dicom")


@dataclass(frozen=True)
class ImageSplits:
    """Train, validation and test splits of one data set (raw labels, optional patient ids).

    The validation split is the data's own (official) one where it has one, else carved from
    the training split by ``with_validation``.
    """

    source: str  # file or folder, for messages
    train_images: np.ndarray  # (N, H, W): uint8, or float32 in [0, 1] (folders)
    train_labels: np.ndarray  # int64 (N,)
    test_images: np.ndarray
    test_labels: np.ndarray
    train_groups: np.ndarray | None = None  # patient id per image
    test_groups: np.ndarray | None = None
    val_images: np.ndarray | None = None
    val_labels: np.ndarray | None = None
    val_groups: np.ndarray | None = None

    def images(self, split: str) -> np.ndarray:
        """The images of ``split`` (train / val / test); an empty array for a missing val."""
        found = getattr(self, f"{split}_images")
        return found if found is not None else self.train_images[:0]

    def labels(self, split: str) -> np.ndarray:
        """The raw labels of ``split``."""
        found = getattr(self, f"{split}_labels")
        return found if found is not None else self.train_labels[:0]

    def groups(self, split: str) -> np.ndarray | None:
        """Patient ids of ``split`` (None when the data has none)."""
        return getattr(self, f"{split}_groups")


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
                       data["test_images"], data["test_labels"],
                       val_images=data["val_images"], val_labels=data["val_labels"])


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
    val = np.zeros(0, dtype=np.int64)
    if images.splits is not None:
        splits = np.asarray(images.splits)
        train, test = np.flatnonzero(splits == "train"), np.flatnonzero(splits == "test")
        val = np.flatnonzero(splits == "val")
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
        pixels[val], labels[val], None if groups is None else groups[val],
    )


def load_splits(spec: ImageTaskSpec, cfg: DictConfig, path: Path | None = None) -> ImageSplits:
    """The data set of this config (or the hospital's own ``path``), labels as in the file,
    with a validation split (``with_validation``)."""
    return with_validation(_source_splits(spec, cfg, path), _val_fraction(cfg), int(cfg.seed))


def _val_fraction(cfg: DictConfig) -> float:
    fraction = float(cfg.task.get("val_fraction", 0.1))
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"task.val_fraction must be in [0, 1), got {fraction}")
    return fraction


def with_validation(splits: ImageSplits, fraction: float, seed: int) -> ImageSplits:
    """``splits`` with a validation split: the data's own val split when it has images, else
    ``fraction`` of the training PATIENTS (images without patient ids count as their own
    patient), label-stratified and seeded (``tasks.partition.split_by_patient``).

    In deployment ``splits`` is one hospital's own data, so its validation split is carved
    from its own training share; in simulation the carve happens before the training split is
    dealt to simulated hospitals, and each hospital gets its share of the validation patients
    (``simulated_parts``), which keeps every patient in exactly one split of one site.
    """
    if len(splits.labels("val")) > 0 or fraction <= 0 or len(splits.train_labels) < 2:
        return splits
    groups = splits.train_groups
    ids = groups if groups is not None else np.arange(len(splits.train_labels)).astype(str)
    parts = split_by_patient(ids, splits.train_labels, fraction, 0.0, seed)
    train, val = parts["train"], parts["val"]
    if len(train) == 0 or len(val) == 0:
        return splits
    return ImageSplits(
        splits.source, splits.train_images[train], splits.train_labels[train],
        splits.test_images, splits.test_labels,
        None if groups is None else groups[train], splits.test_groups,
        splits.train_images[val], splits.train_labels[val],
        None if groups is None else groups[val],
    )


def _source_splits(spec: ImageTaskSpec, cfg: DictConfig, path: Path | None) -> ImageSplits:
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
        sizes = {split: len(splits.labels(split)) for split in SPLITS}
        ids = spec.patient_ids(folder, dataset, sizes) or {}
        flips = spec.flips(folder, dataset, sizes, cfg) or {}
        return ImageSplits(
            splits.source, _flipped(splits.train_images, flips.get("train")),
            splits.train_labels, _flipped(splits.test_images, flips.get("test")),
            splits.test_labels, ids.get("train"), ids.get("test"),
            _flipped(splits.images("val"), flips.get("val")), splits.labels("val"),
            ids.get("val"),
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


@dataclass(frozen=True)
class SimulatedSites:
    """A data set dealt to simulated hospitals.

    ``kept[split]`` says which images of the split the task keeps and their target labels;
    ``parts[split][s]`` are simulated site ``s``'s indices into the KEPT images of the split.
    """

    splits: ImageSplits
    kept: dict[str, Relabelled]
    parts: dict[str, list[np.ndarray]]

    def groups(self, split: str) -> np.ndarray | None:
        """Patient ids of the kept images of ``split`` (None without patient ids)."""
        groups = self.splits.groups(split)
        return None if groups is None else groups[self.kept[split].keep]


def relabel_all(spec: ImageTaskSpec, cfg: DictConfig, splits: ImageSplits) -> dict[str, Relabelled]:
    """The task's relabelling of every split (validates the raw labels, naming the split)."""
    return {split: spec.relabel(splits.labels(split), cfg, f"{splits.source} ({split})")
            for split in SPLITS}


def _train_share(parts: list[np.ndarray], fraction: float, seed: int) -> list[np.ndarray]:
    """``task.train_fraction`` of each simulated site's training images (seeded; at least
    one), the rest unused: small training sets (e.g. to study overfitting). The sites' val
    and test images do not change with it."""
    if not 0.0 < fraction <= 1.0:
        raise DataError(f"task.train_fraction must be in (0, 1], got {fraction}")
    if fraction == 1.0:
        return parts
    rng = np.random.default_rng(seed + 3)
    return [np.sort(rng.choice(p, max(1, round(fraction * len(p))), replace=False))
            for p in parts]


def simulated_parts(spec: ImageTaskSpec, cfg: DictConfig) -> SimulatedSites:
    """The data set, its relabelling, and each simulated site's train / val / test indices.

    The TRAIN split is partitioned by ``partition`` (whole patients where ids exist); the VAL
    and TEST splits are dealt with the same per-class shares (``matched_split``).
    """
    splits = load_splits(spec, cfg)
    kept = relabel_all(spec, cfg, splits)
    seed = int(cfg.seed)
    sites = SimulatedSites(splits, kept, {})
    train_groups = sites.groups("train")
    extra = {} if train_groups is None else {"groups": train_groups}
    train_parts = partition_indices(kept["train"].labels, cfg.partition, seed, **extra)
    reference = [kept["train"].labels[p] for p in train_parts]
    sites.parts["train"] = _train_share(train_parts, float(cfg.task.get("train_fraction", 1.0)),
                                        seed)
    # seed + 1 for test keeps the test shares of earlier runs; val gets its own stream
    for split, offset in (("test", 1), ("val", 2)):
        sites.parts[split] = matched_split(kept[split].labels, reference, seed + offset,
                                           sites.groups(split))
    return sites


def load_image_site(spec: ImageTaskSpec, cfg: DictConfig, site: SiteRef) -> SiteData:
    """One site's prepared train, val and test data (see the module docstring for sources)."""
    if site.data_path is not None:
        splits = load_splits(spec, cfg, Path(site.data_path))
        sites = SimulatedSites(splits, relabel_all(spec, cfg, splits), {})
        sites.parts.update({s: [np.arange(len(sites.kept[s].labels))] for s in SPLITS})
        index = 0
    else:
        if site.index is None:
            raise DataError(f"site {site.name} has neither a partition-id nor a data-path")
        sites = simulated_parts(spec, cfg)
        index = site.index
        if index >= len(sites.parts["train"]):
            raise DataError(f"site index {index} is outside the {len(sites.parts['train'])} "
                            "sites of partition.num_sites")
    images, labels, patients = {}, {}, {}
    for split in SPLITS:
        idx = sites.parts[split][index]
        images[split] = sites.splits.images(split)[sites.kept[split].keep][idx]
        labels[split] = sites.kept[split].labels[idx]
        groups = sites.groups(split)
        patients[split] = None if groups is None else groups[idx]
    return make_site(spec, cfg, site.name, images, labels,
                     augment_seed=int(cfg.seed) + 1000 * index, patients=patients)


def make_site(
    spec: ImageTaskSpec, cfg: DictConfig, name: str, images: dict[str, np.ndarray],
    labels: dict[str, np.ndarray], augment_seed: int,
    patients: dict[str, np.ndarray | None] | None = None,
) -> SiteData:
    """Prepare (scale, standardise, resize) a site's images once and wrap them as datasets.

    ``images`` / ``labels`` hold the ``train``, ``val`` and ``test`` splits; ``patients``
    (patient id per image, per split) is kept in ``SiteData.extras["patients"]``.
    """
    prepared = {split: preprocess(images[split], cfg) for split in SPLITS}
    size = int(prepared["train"].shape[-1])
    classes = spec.classes(cfg)
    transform = augmentation(cfg.task.get("augment"), size, augment_seed)
    info = {
        "in_channels": 1,
        "image_size": size,
        "num_classes": len(classes),
        "classes": classes,
        "dataset": str(cfg.task.dataset),
        **{f"{split}_class_counts": np.bincount(labels[split], minlength=len(classes)).tolist()
           for split in SPLITS},
        **spec.extra_info(cfg),
    }
    return SiteData(
        name=name,
        train=ImageDataset(prepared["train"], labels["train"], transform),
        test=ImageDataset(prepared["test"], labels["test"]),
        # possibly empty (a site dealt no validation image): every image site of a run then
        # sends the same metric keys (Flower refuses evaluate replies whose keys differ)
        val=ImageDataset(prepared["val"], labels["val"]),
        num_classes=len(classes),
        info=info,
        extras={"patients": patients or {}},
    )


def preprocess(images: np.ndarray, cfg: DictConfig) -> torch.Tensor:
    """The task's deterministic preprocessing (scale to [0, 1], intensity standardisation,
    resize), the same at training, evaluation and external validation."""
    return prepare_images(images, _image_size(cfg), str(cfg.task.get("intensity", "none")))


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
