"""Image data loading shared by the imaging tasks: MedMNIST npz, a hospital's folder, one image.

- ``load_npz``: MedMNIST layout (``{train,val,test}_{images,labels}``), any resolution;
  images come back as uint8 (N, H, W) grayscale, labels as int64 (N,).
- ``load_image``: one PNG / JPEG / 16-bit PNG / PGM / TIFF / DICOM file as float32 (H, W) in
  [0, 1], in display orientation (row 0 = top), read with MONAI ``LoadImage``.
- ``load_folder``: a hospital's own images, listed by a CSV manifest ``path,label[,patient_id]``
  (optional extra column ``split``) or laid out as class sub-folders, as an ``ImageSet``.

Intensity scaling (``load_image``): 8-bit images are divided by 255, so a PNG and the same
pixels stored in an npz agree exactly; 16-bit / 32-bit images are scaled by their own min-max,
because such files (e.g. PNGs exported from DICOM) put 10-16 significant bits in the container
and the container's maximum says nothing about the real range; DICOM follows ``tasks.dicom``.
Every error about the data is a ``tasks.DataError`` naming the file (and manifest line).
"""

from __future__ import annotations

import csv
import warnings
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from tasks.base import DataError
from tasks.dicom import DICOM_SUFFIXES, is_dicom, load_dicom
from tasks.image_transforms import quiet_load_image
from tasks.partition import split_by_patient

SPLITS = ("train", "val", "test")
NPZ_KEYS = tuple(f"{split}_{kind}" for split in SPLITS for kind in ("images", "labels"))
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".pgm", ".ppm", ".tif", ".tiff", ".bmp"}
MANIFEST_NAMES = ("manifest.csv", "labels.csv")

Size = int | tuple[int, int]


# --------------------------------------------------------------------------- npz (MedMNIST)


def load_npz(path: Path) -> dict[str, np.ndarray]:
    """Read a MedMNIST-layout npz: ``{split}_images`` uint8 (N, H, W), labels int64 (N,).

    Accepts images stored (N, H, W), (N, H, W, 1) or RGB (N, H, W, 3) (converted to grayscale
    with the ITU-R 601 weights PIL uses), uint8 or float in [0, 1]; labels (N,) or (N, 1).
    Raises DataError naming the file for a missing, truncated or corrupt file, missing keys,
    or images and labels of different lengths.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: npz file does not exist")
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [key for key in NPZ_KEYS if key not in archive.files]
            if missing:
                raise DataError(
                    f"{path}: missing key(s) {', '.join(missing)} (MedMNIST layout needs "
                    f"{', '.join(NPZ_KEYS)}; found {', '.join(archive.files) or 'none'})"
                )
            # Decompress every array now, inside the try, so a truncated member fails here.
            raw = {key: archive[key] for key in NPZ_KEYS}
    except DataError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as exc:
        raise DataError(f"{path}: truncated or corrupt npz file ({type(exc).__name__}: {exc})") \
            from exc
    out: dict[str, np.ndarray] = {}
    for split in SPLITS:
        images = _as_gray_uint8(raw[f"{split}_images"], path, f"{split}_images")
        labels = _as_labels(raw[f"{split}_labels"], path, f"{split}_labels")
        if len(images) != len(labels):
            raise DataError(
                f"{path}: {split}_images has {len(images)} images but {split}_labels has "
                f"{len(labels)} labels"
            )
        out[f"{split}_images"], out[f"{split}_labels"] = images, labels
    return out


def _as_gray_uint8(images: np.ndarray, path: Path, key: str) -> np.ndarray:
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    elif images.ndim == 4 and images.shape[-1] == 3:
        images = _rgb_to_gray(images)
    if images.ndim != 3:
        raise DataError(
            f"{path}: {key} has shape {images.shape}; expected (N, H, W), (N, H, W, 1) or "
            "(N, H, W, 3)"
        )
    if images.dtype == np.uint8:
        return np.ascontiguousarray(images)
    if np.issubdtype(images.dtype, np.floating) and images.size and (
        images.min() >= 0.0 and images.max() <= 1.0
    ):
        return np.round(images * 255.0).astype(np.uint8)
    if np.issubdtype(images.dtype, np.integer) and (
        images.size == 0 or (images.min() >= 0 and images.max() <= 255)
    ):
        return images.astype(np.uint8)
    raise DataError(
        f"{path}: {key} has dtype {images.dtype} with values outside uint8 / [0, 1]; "
        "convert it with scripts/prepare_images.py"
    )


def _rgb_to_gray(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) -> (N, H, W) with torchvision's ITU-R 601-2 luma (the weights of PIL 'L')."""
    import torch
    from torchvision.transforms.v2.functional import rgb_to_grayscale

    as_float = images.astype(np.float32) / (255.0 if images.dtype == np.uint8 else 1.0)
    gray = rgb_to_grayscale(torch.from_numpy(as_float).permute(0, 3, 1, 2)).numpy()[:, 0]
    return np.clip(gray, 0.0, 1.0).astype(np.float32)  # float [0, 1]: rounded to uint8 later


def _as_labels(labels: np.ndarray, path: Path, key: str) -> np.ndarray:
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise DataError(f"{path}: {key} has shape {labels.shape}; expected (N,) or (N, 1) "
                        "(multi-label data is not supported)")
    if labels.size and (not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0):
        raise DataError(f"{path}: {key} must hold non-negative integer class indices")
    return labels.astype(np.int64)


# --------------------------------------------------------------------------- one image


@cache
def _pil_loader():
    """One MONAI LoadImage for PIL formats per process (building it registers all readers)."""
    from monai.data import PILReader

    # reverse_indexing=False keeps numpy's (rows, columns) = (H, W) order; MONAI's default
    # returns (W, H), the transpose of the picture. dtype None keeps uint8 vs uint16 so the
    # scaling can tell them apart.
    return quiet_load_image(PILReader(converter=_to_gray_pil, reverse_indexing=False), None)


def _to_gray_pil(image):
    """PIL image -> single channel, keeping 16-bit / 32-bit modes as they are."""
    if image.mode in ("L", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return image
    return image.convert("L")  # RGB, RGBA, LA, P, 1: luma as PIL computes it


def load_image(path: Path, size: Size | None = None) -> np.ndarray:
    """One image file as float32 (H, W) in [0, 1], row 0 at the top, optionally resized.

    PNG / JPEG / PGM / TIFF / BMP through MONAI ``LoadImage`` (PIL); DICOM through
    ``tasks.dicom.load_dicom``. ``size`` resizes with area averaging (an exact block mean for
    integer factors, like PIL's BOX filter used for the shipped npz files).
    """
    from monai.transforms import ScaleIntensity, ScaleIntensityRange

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image file does not exist")
    if path.suffix.lower() in DICOM_SUFFIXES or (
        path.suffix.lower() not in IMAGE_SUFFIXES and is_dicom(path)
    ):
        pixels = load_dicom(path)
    else:
        try:
            with warnings.catch_warnings():
                # PILReader hands torch a read-only view of the PIL buffer; harmless here.
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                raw = np.asarray(_pil_loader()(str(path)))
        except Exception as exc:  # any reader failure becomes one DataError
            raise DataError(f"{path}: unreadable image ({type(exc).__name__}: {exc})") from exc
        if raw.ndim != 2:
            raise DataError(f"{path}: decoded to shape {raw.shape}; expected a 2D image")
        if raw.dtype == np.uint8:
            pixels = np.asarray(ScaleIntensityRange(0.0, 255.0, 0.0, 1.0)(raw.astype(np.float32)))
        else:
            pixels = np.asarray(ScaleIntensity(minv=0.0, maxv=1.0)(raw.astype(np.float32)))
    if size is not None:
        pixels = resize(pixels, size)
    return np.ascontiguousarray(pixels, dtype=np.float32)


def resize(image: np.ndarray, size: Size) -> np.ndarray:
    """Resize a float (H, W) image to ``size`` with MONAI ``Resize`` (area averaging)."""
    from monai.transforms import Resize

    target = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
    if image.shape == target:
        return image
    resized = Resize(spatial_size=target, mode="area")(image[None].astype(np.float32))
    return np.asarray(resized, dtype=np.float32)[0]


# --------------------------------------------------------------------------- a hospital's folder


@dataclass
class ImageSet:
    """A hospital's images, in manifest (or sorted folder) order.

    ``images`` is always one float32 array (N, 1, H, W) in [0, 1]: pass ``size`` to
    ``load_folder`` when the files differ in size. ``splits`` holds the manifest's optional
    ``split`` column (train / val / test), else None; ``patient_ids`` likewise.
    """

    images: np.ndarray
    labels: np.ndarray
    paths: list[str]
    classes: list[str]
    patient_ids: list[str] | None = None
    splits: list[str] | None = None

    def __len__(self) -> int:
        return len(self.labels)


def load_folder(
    folder: Path,
    manifest: Path | None = None,
    classes: Sequence[str] | None = None,
    size: Size | None = None,
) -> ImageSet:
    """Load a hospital's images from a CSV manifest or from class sub-folders.

    - ``manifest`` given, or ``folder/manifest.csv`` / ``folder/labels.csv`` present: a CSV with
      header ``path,label[,patient_id][,split]``; paths are relative to the manifest's folder.
      A label is a class name from ``classes`` or an integer index into it; without ``classes``
      integer labels are taken as they are and names are sorted into ``classes``.
    - otherwise one sub-folder per class (``classes`` gives their order; default sorted), any
      depth of images below it; no patient ids.

    Raises DataError naming the manifest line for a missing or unreadable image or a label
    outside the class set, and the files when sizes differ and ``size`` is None.
    """
    folder = Path(folder)
    if manifest is None:
        manifest = next((folder / n for n in MANIFEST_NAMES if (folder / n).is_file()), None)
    if manifest is not None:
        rows, classes_out = _read_manifest(Path(manifest), classes)
    else:
        rows, classes_out = _scan_class_folders(folder, classes)
    images = [_load_row(row, size) for row in rows]
    shapes = {img.shape for img in images}
    if len(shapes) > 1:
        first = rows[0]
        other = next(r for r, img in zip(rows, images, strict=True) if img.shape != images[0].shape)
        raise DataError(
            f"{first.where}: images differ in size ({first.path} is {images[0].shape}, "
            f"{other.path} is {images[rows.index(other)].shape}); pass size= to resize them"
        )
    stacked = (np.stack(images)[:, None] if images else np.zeros((0, 1, 1, 1), np.float32))
    has_patients = any(r.patient_id is not None for r in rows)
    has_splits = any(r.split is not None for r in rows)
    return ImageSet(
        images=stacked.astype(np.float32),
        labels=np.asarray([r.label for r in rows], dtype=np.int64),
        paths=[str(r.path) for r in rows],
        classes=classes_out,
        patient_ids=[r.patient_id or "" for r in rows] if has_patients else None,
        splits=[r.split or "" for r in rows] if has_splits else None,
    )


@dataclass
class _Row:
    path: Path
    label: int
    where: str  # "manifest.csv:12" or the file itself, for error messages
    patient_id: str | None = None
    split: str | None = None


def _load_row(row: _Row, size: Size | None) -> np.ndarray:
    try:
        return load_image(row.path, size)
    except DataError as exc:
        raise DataError(f"{row.where}: {exc}") from exc


def _read_manifest(manifest: Path, classes: Sequence[str] | None) -> tuple[list[_Row], list[str]]:
    if not manifest.is_file():
        raise DataError(f"{manifest}: manifest does not exist")
    with manifest.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        fields = [f.strip() for f in reader.fieldnames or []]
        missing = [c for c in ("path", "label") if c not in fields]
        if missing:
            raise DataError(
                f"{manifest}: header must start with path,label[,patient_id][,split]; "
                f"missing column(s) {', '.join(missing)} (found {', '.join(fields) or 'none'})"
            )
        reader.fieldnames = fields
        raw = [(reader.line_num, row) for row in reader]
    if not raw:
        raise DataError(f"{manifest}: manifest lists no images")
    names = [str(row["label"]).strip() for _, row in raw]
    classes_out = _class_set(names, classes)
    rows = []
    for (line, row), name in zip(raw, names, strict=True):
        where = f"{manifest}:{line}"
        rel = str(row["path"] or "").strip()
        if not rel:
            raise DataError(f"{where}: empty path")
        path = (manifest.parent / rel) if not Path(rel).is_absolute() else Path(rel)
        if not path.is_file():
            raise DataError(f"{where}: image {rel} does not exist ({path})")
        split = (row.get("split") or "").strip() or None
        if split is not None and split not in SPLITS:
            raise DataError(f"{where}: split '{split}' is not one of {', '.join(SPLITS)}")
        rows.append(_Row(
            path=path,
            label=_label_index(name, classes_out, classes is not None, where),
            where=where,
            patient_id=(row.get("patient_id") or "").strip() or None,
            split=split,
        ))
    return rows, classes_out


def _class_set(names: list[str], classes: Sequence[str] | None) -> list[str]:
    if classes is not None:
        return [str(c) for c in classes]
    if all(n.lstrip("-").isdigit() for n in names):
        return [str(i) for i in range(max(int(n) for n in names) + 1)]
    return sorted(set(names))


def _label_index(name: str, classes: list[str], explicit: bool, where: str) -> int:
    if name in classes:
        return classes.index(name)
    # An integer index is accepted when the caller named the classes (e.g. "0" for normal).
    if explicit and name.isdigit() and int(name) < len(classes):
        return int(name)
    raise DataError(f"{where}: label '{name}' is not one of the classes {classes}")


def _scan_class_folders(
    folder: Path, classes: Sequence[str] | None
) -> tuple[list[_Row], list[str]]:
    if not folder.is_dir():
        raise DataError(f"{folder}: image folder does not exist")
    subdirs = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subdirs:
        raise DataError(f"{folder}: no manifest.csv / labels.csv and no class sub-folders")
    classes_out = [str(c) for c in classes] if classes is not None else subdirs
    unknown = [d for d in subdirs if d not in classes_out]
    if unknown:
        raise DataError(
            f"{folder}: sub-folder(s) {unknown} are not among the classes {classes_out}"
        )
    rows = []
    for label, name in enumerate(classes_out):
        for path in sorted((folder / name).rglob("*")):
            suffix = path.suffix.lower()
            # DICOM exports often have no extension at all (IM0001): recognise them by content.
            known = suffix in IMAGE_SUFFIXES or suffix in DICOM_SUFFIXES
            if path.is_file() and not path.name.startswith(".") and (
                known or (suffix == "" and is_dicom(path))
            ):
                rows.append(_Row(path=path, label=label, where=str(path)))
    if not rows:
        raise DataError(f"{folder}: the class sub-folders hold no images")
    return rows, classes_out


def assign_splits(data: ImageSet, val_fraction: float, test_fraction: float,
                  seed: int) -> dict[str, np.ndarray]:
    """Example indices of train / val / test: the CSV's split column, else a patient-level split."""
    patients = data.patient_ids or [f"image-{i}" for i in range(len(data))]
    if data.splits is not None and all(data.splits):
        splits = np.asarray(data.splits)
        parts = {split: np.flatnonzero(splits == split) for split in SPLITS}
    else:
        parts = split_by_patient(patients, data.labels, val_fraction, test_fraction, seed)
    seen: dict[str, str] = {}
    for split, idx in parts.items():
        for i in idx:
            other = seen.setdefault(patients[i], split)
            if other != split:
                raise DataError(f"patient {patients[i]} has images in both {other} and {split}")
    for split, fraction in (("train", 1.0), ("val", val_fraction), ("test", test_fraction)):
        if fraction > 0 and len(parts[split]) == 0:
            raise DataError(
                f"the {split} split is empty ({len(set(patients))} patients); use more patients "
                "or change --val-fraction / --test-fraction"
            )
    return parts
