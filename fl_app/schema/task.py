"""Schemas of ``conf/task/*.yaml`` (values and comments live in the yaml files)."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING


@dataclass
class Task:
    """What every task option has: data location, model and the local training settings."""

    name: str = MISSING
    data_dir: str | None = MISSING
    model: str = MISSING
    test_fraction: float = MISSING
    local_epochs: int = MISSING
    batch_size: int = MISSING
    lr: float = MISSING
    momentum: float = MISSING
    weight_decay: float = MISSING


@dataclass
class BreastCancer(Task):
    """conf/task/breast_cancer.yaml."""

    hidden_size: int = MISSING
    val_fraction: float = MISSING


@dataclass
class HeartDisease(BreastCancer):
    """conf/task/heart_disease.yaml."""

    protocol: str = MISSING
    split_seed: int | None = MISSING


@dataclass
class Augment:
    """``task.augment`` of the imaging tasks (MONAI training-time augmentation)."""

    enabled: bool = MISSING
    flip_prob: float = MISSING
    rotate_prob: float = MISSING
    rotate_deg: float = MISSING
    zoom_prob: float = MISSING
    zoom_min: float = MISSING
    zoom_max: float = MISSING
    affine_prob: float = MISSING
    translate: float = MISSING
    shear: float = MISSING


@dataclass
class Patch:
    """``task.patch`` of mammography (``task.view=patch``: lesion-centred windows)."""

    size: int = MISSING
    normals_per_film: int = MISSING
    lesion_copies: int = MISSING
    jitter: float = MISSING
    eval_normals_per_film: int = MISSING
    eval_lesion_copies: int = MISSING
    stride: int = MISSING
    film_topk: int = MISSING


@dataclass
class ImageTask(Task):
    """What the imaging tasks share."""

    dataset: str = MISSING
    classes: list[str] | None = MISSING
    image_size: int | None = MISSING
    norm: str = MISSING
    norm_groups: int = MISSING
    cnn_widths: list[int] = MISSING
    dropout: float = MISSING
    optimizer: str = MISSING
    augment: Augment = field(default_factory=Augment)
    val_fraction: float = MISSING
    train_fraction: float = MISSING
    intensity: str = MISSING
    # a number ("0.5"), "youden" or "sensitivity:<s>" (fl_app.threshold parses it)
    threshold: str = MISSING


@dataclass
class ChestXray(ImageTask):
    """conf/task/chest_xray.yaml."""


@dataclass
class Mammography(ImageTask):
    """conf/task/mammography.yaml."""

    target: str = MISSING
    align_laterality: bool = MISSING
    view: str = MISSING
    patch: Patch = field(default_factory=Patch)


SCHEMAS: dict[str, type] = {
    "breast_cancer_schema": BreastCancer,
    "heart_disease_schema": HeartDisease,
    "chest_xray_schema": ChestXray,
    "mammography_schema": Mammography,
}
