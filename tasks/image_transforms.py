"""MONAI transform pipelines of the imaging tasks, and the dataset that applies them.

Two stages, on purpose:
- ``prepare_images`` (deterministic: intensity scaling to [0, 1], resize) runs ONCE per site
  on the whole array, treating the N images as N channels of one MONAI image, so a site's
  data is ready in a single vectorised call instead of N per-item calls every epoch;
- ``augmentation`` (random flip / rotate / zoom / affine) runs per training example, per
  epoch, inside ``ImageDataset.__getitem__``; test data is never augmented.

The augmentation keys (``task.augment``):
``enabled``, ``flip_prob`` (left-right flip), ``rotate_prob`` + ``rotate_deg`` (max absolute
angle), ``zoom_prob`` + ``zoom_min`` / ``zoom_max``, ``affine_prob`` + ``translate`` (max shift
as a fraction of the image size) + ``shear`` (max shear factor).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from monai.data import get_track_meta, set_track_meta
from monai.transforms import (
    Compose,
    HistogramNormalize,
    NormalizeIntensity,
    RandAffine,
    RandFlip,
    RandRotate,
    RandZoom,
    Resize,
    ScaleIntensityRange,
)
from torch.utils.data import Dataset

INTENSITY_MODES = ("none", "normalize", "histeq")


def prepare_images(
    images: np.ndarray, image_size: int | None = None, intensity: str = "none"
) -> torch.Tensor:
    """(N, H, W) grayscale images (uint8 0-255, or float in [0, 1]) -> float32 (N, 1, S, S).

    Intensities are scaled to [0, 1] with MONAI's ``ScaleIntensityRange`` (uint8 only; float
    images must already be in [0, 1], as the DICOM and folder loaders return them). With
    ``image_size`` the images are resized with MONAI's ``Resize`` (area averaging when
    shrinking, bilinear when enlarging); ``None`` keeps the stored size. ``intensity``
    (``task.intensity``) then standardises each image on its own (``standardise``).
    """
    if images.ndim != 3:
        raise ValueError(f"expected grayscale images of shape (N, H, W), got {images.shape}")
    if intensity not in INTENSITY_MODES:
        raise ValueError(f"task.intensity must be one of {', '.join(INTENSITY_MODES)}, "
                         f"got '{intensity}'")
    if len(images) == 0:
        side = image_size or images.shape[1]
        return torch.zeros((0, 1, side, side), dtype=torch.float32)
    if images.dtype == np.uint8:
        scale = ScaleIntensityRange(a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0, clip=True)
        data = scale(images)
    else:
        data = torch.as_tensor(images, dtype=torch.float32)
    data = _plain(data)
    if image_size is not None and (data.shape[1], data.shape[2]) != (image_size, image_size):
        shrink = image_size < min(data.shape[1], data.shape[2])
        resize = Resize((image_size, image_size), mode="area" if shrink else "bilinear")
        data = _plain(resize(data))  # the N images act as N channels of one image
    return standardise(data, intensity).unsqueeze(1).contiguous()


def standardise(data: torch.Tensor, intensity: str) -> torch.Tensor:
    """Per-image intensity standardisation of (N, H, W) images in [0, 1].

    - ``none``: unchanged;
    - ``normalize``: MONAI ``NormalizeIntensity`` per image (zero mean, unit standard
      deviation), which removes a scanner's or site's overall brightness and contrast;
    - ``histeq``: MONAI ``HistogramNormalize`` per image (histogram equalisation to [0, 1]),
      which also removes a non-linear grey-level mapping (different film/detector curves).
    Each image is standardised by its own statistics, so a site, the external validation
    and a single image all get the same result for the same pixels.
    """
    if intensity == "none":
        return data
    if intensity == "normalize":
        # the N images are the N channels of one MONAI image: channel_wise = per image
        return _plain(NormalizeIntensity(channel_wise=True)(data))
    equalise = HistogramNormalize(num_bins=256, min=0, max=1)
    return torch.stack([_plain(equalise(image[None]))[0] for image in data])


def _plain(data: Any) -> torch.Tensor:
    # MONAI returns MetaTensors; models, Opacus and default_collate want plain tensors.
    tensor = data.as_tensor() if hasattr(data, "as_tensor") else torch.as_tensor(data)
    return tensor.to(torch.float32)


def augmentation(
    aug: Any, image_size: int, seed: int
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The random augmentation for one (1, S, S) training image, or None when disabled.

    ``aug`` is the ``task.augment`` config; the MONAI random state is seeded with ``seed``.
    """
    if aug is None or not bool(aug.get("enabled", False)):
        return None
    steps: list[Any] = []
    if float(aug.get("flip_prob", 0.0)) > 0:
        # axis 1 of a (C, H, W) image is W: a left-right flip
        steps.append(RandFlip(prob=float(aug.flip_prob), spatial_axis=1))
    if float(aug.get("rotate_prob", 0.0)) > 0:
        angle = math.radians(float(aug.get("rotate_deg", 10.0)))
        steps.append(RandRotate(range_x=angle, prob=float(aug.rotate_prob), keep_size=True,
                                padding_mode="zeros"))
    if float(aug.get("zoom_prob", 0.0)) > 0:
        steps.append(RandZoom(prob=float(aug.zoom_prob), min_zoom=float(aug.get("zoom_min", 0.9)),
                              max_zoom=float(aug.get("zoom_max", 1.1)), keep_size=True))
    if float(aug.get("affine_prob", 0.0)) > 0:
        steps.append(_affine(aug, image_size))
    if not steps:
        return None
    pipeline = Compose(steps)
    pipeline.set_random_state(seed=seed)
    return pipeline


def _affine(aug: Any, image_size: int) -> RandAffine:
    # MONAI's translate_range is in pixels; the config gives a fraction of the image size.
    shift = float(aug.get("translate", 0.05)) * image_size
    shear = float(aug.get("shear", 0.0))
    return RandAffine(
        prob=float(aug.affine_prob),
        translate_range=(shift, shift) if shift > 0 else None,
        shear_range=(shear, shear) if shear > 0 else None,
        padding_mode="zeros",
    )


class ImageDataset(Dataset):
    """Prepared images (N, 1, H, W) and int64 labels, with an optional per-item transform."""

    def __init__(self, images: torch.Tensor, labels: np.ndarray | torch.Tensor,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        if self.transform is not None:
            image = _untracked(self.transform, image)
        return image, self.labels[index]


def _untracked(
    transform: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor
) -> torch.Tensor:
    """Apply a MONAI transform with metadata tracking off (10-40x faster on small images).

    MONAI's switch is process-global, so it is restored right after the call.
    """
    previous = get_track_meta()
    set_track_meta(False)
    try:
        return _plain(transform(image))
    finally:
        set_track_meta(previous)


def quiet_load_image(reader: Any, dtype: Any) -> Callable[..., Any]:
    """A MONAI ``LoadImage`` with ``reader``, built without MONAI's codec start-up noise.

    LoadImage instantiates all of MONAI's readers, including the nvImageCodec one, which
    logs/warns on machines without CUDA codecs; that noise says nothing about our files.
    """
    from monai.transforms import LoadImage

    monai_logger = logging.getLogger("monai.data.nvimgcodec_pydicom_plugin")
    level = monai_logger.level
    monai_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return LoadImage(reader=reader, image_only=True, dtype=dtype)
    finally:
        monai_logger.setLevel(level)
