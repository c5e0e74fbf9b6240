"""Cheap checks that a SuperNode's ``data-path`` holds data of the right kind for a task.

They run before any data is loaded (on every message a ClientApp gets), so they only look at
file names, a few bytes, or a zip directory. A task opts in with ``Task.check_data_path``; the
check raises DataError saying what the path holds and what the task needs, so a hospital that
pointed its SuperNode at the wrong folder learns it in the first (query) round, before any
training starts.
"""

from __future__ import annotations

import zipfile
from collections import Counter
from pathlib import Path

from tasks.base import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".pgm", ".tif", ".tiff", ".bmp")
ARRAY_SUFFIXES = (".npz", ".npy")
NPZ_KEYS = ("train_images", "train_labels", "test_images", "test_labels")
MAX_LISTED = 2000  # files looked at when describing a folder


def describe_folder(folder: Path) -> str:
    """``'120 .png, 1 .csv'``: the commonest file types in ``folder`` (recursive, capped)."""
    counts: Counter[str] = Counter()
    for i, path in enumerate(folder.rglob("*")):
        if i >= MAX_LISTED:
            break
        if path.is_file():
            counts[path.suffix.lower() or "(no suffix)"] += 1
    if not counts:
        return "nothing"
    return ", ".join(f"{n} {suffix}" for suffix, n in counts.most_common(4))


def kind_of_file(path: Path) -> str:
    """A word for what a file looks like: 'image', 'array', 'binary' or 'text'."""
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in ARRAY_SUFFIXES:
        return "array"
    with path.open("rb") as handle:
        head = handle.read(4096)
    if head.startswith(b"PK\x03\x04"):
        return "array"  # an .npz under another name is a zip file
    if b"\x00" in head or head[128:132] == b"DICM":
        return "binary"
    return "text"


def first_data_line(path: Path) -> str:
    """The first non-empty line of a text file (read from its first 4 KiB)."""
    with path.open("rb") as handle:
        head = handle.read(4096).decode("utf-8", errors="replace")
    return next((line.strip() for line in head.splitlines() if line.strip()), "")


def check_image_source(path: Path, site_name: str) -> None:
    """An imaging task's data: a MedMNIST-layout ``.npz``, or a folder with a manifest or
    image files (PNG/JPEG/PGM/TIFF/BMP, DICOM with or without a suffix)."""
    if path.is_dir():
        # the loaders' own lists (imported here: heart_disease uses this module too)
        from tasks.dicom import is_dicom
        from tasks.image_data import IMAGE_SUFFIXES as LOADABLE
        from tasks.image_data import MANIFEST_NAMES

        if any((path / name).is_file() for name in MANIFEST_NAMES):
            return
        for file in _limited(path.rglob("*")):
            suffix = file.suffix.lower()
            if suffix in LOADABLE or suffix in IMAGE_SUFFIXES or (
                    suffix == "" and file.is_file() and is_dicom(file)):
                return
        raise DataError(
            f"{path} holds no image files ({describe_folder(path)}); an imaging task needs a "
            f"folder of {'/'.join(IMAGE_SUFFIXES[:5])} images or a MedMNIST-layout .npz"
        )
    kind = kind_of_file(path)
    if kind != "array":
        raise DataError(
            f"{path} is a {kind} file; an imaging task needs a MedMNIST-layout .npz (arrays "
            f"{', '.join(NPZ_KEYS)}) or a folder of images"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            keys = {name.removesuffix(".npy") for name in archive.namelist()}
    except zipfile.BadZipFile:
        raise DataError(f"{path} is not a readable .npz (zip) file") from None
    missing = [k for k in NPZ_KEYS if k not in keys]
    if missing:
        raise DataError(f"{path} lacks the arrays {', '.join(missing)} (it has "
                        f"{', '.join(sorted(keys)) or 'none'}); an imaging task needs a "
                        "MedMNIST-layout .npz")


def _limited(paths: object, limit: int = MAX_LISTED) -> list[Path]:
    out: list[Path] = []
    for i, p in enumerate(paths):  # type: ignore[call-overload]
        if i >= limit:
            break
        out.append(p)
    return out
