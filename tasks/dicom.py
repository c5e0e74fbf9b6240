"""Read one DICOM radiograph into a float32 (H, W) image in [0, 1], through MONAI.

MONAI's ``PydicomReader`` decodes the pixels and applies RescaleSlope / RescaleIntercept (the
Modality LUT). It does *not* handle the presentation, so this module adds, in DICOM order:

1. windowing (VOI): WindowCenter / WindowWidth when the file has them (first value if several),
   else the image's own min-max, both with MONAI intensity transforms, clipped to [0, 1];
2. MONOCHROME1 inversion (``1 - x``): in MONOCHROME1 the lowest stored value is *white*, so
   without it bright lungs come out dark and a model sees a photographic negative.

Orientation: ``swap_ij=False`` keeps pydicom's (Rows, Columns) order, i.e. (H, W) as displayed
(MONAI's default swaps the two axes). VOI LUT Sequences and multi-frame files are not handled.

Undecodable pixel data (e.g. JPEG 2000 without a codec) raises ``DataError`` naming the file, the
transfer syntax and the packages pydicom would need, taken from pydicom's own decoder registry.
"""

from __future__ import annotations

import warnings
from functools import cache
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from tasks.base import DataError
from tasks.image_transforms import quiet_load_image

DICOM_SUFFIXES = {".dcm", ".dicom"}


def is_dicom(path: Path) -> bool:
    """True for a ``.dcm`` / ``.dicom`` suffix or a file with the DICM preamble."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        return bool(pydicom.misc.is_dicom(str(path)))
    except OSError:
        return False


@cache
def _loader():
    """One MONAI LoadImage for DICOM per process (building it registers every MONAI reader)."""
    from monai.data import PydicomReader

    return quiet_load_image(PydicomReader(swap_ij=False, affine_lps_to_ras=False), np.float32)


def read_header(path: Path) -> pydicom.Dataset:
    """The DICOM header without pixel data; DataError if the file is not readable DICOM."""
    if not path.is_file():
        raise DataError(f"{path}: DICOM file does not exist")
    try:
        return pydicom.dcmread(str(path), stop_before_pixels=True)
    except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
        raise DataError(f"{path}: not a readable DICOM file ({exc})") from exc


def load_dicom(path: Path) -> np.ndarray:
    """Pixels of one single-frame grayscale DICOM as float32 (H, W) in [0, 1], as displayed."""
    from monai.transforms import ScaleIntensity, ScaleIntensityRange

    path = Path(path)
    header = read_header(path)
    if int(header.get("SamplesPerPixel", 1)) != 1:
        raise DataError(
            f"{path}: {header.get('PhotometricInterpretation')} DICOM with "
            f"{header.SamplesPerPixel} samples per pixel; only grayscale radiographs are supported"
        )
    if int(header.get("NumberOfFrames", 1) or 1) > 1:
        raise DataError(f"{path}: multi-frame DICOM ({header.NumberOfFrames} frames) not supported")
    try:
        with warnings.catch_warnings():
            # Projection radiographs have no ImageOrientationPatient; MONAI warns that the
            # affine defaults to identity, which is irrelevant for a 2D (H, W) array.
            warnings.simplefilter("ignore")
            image = _loader()(str(path))
    except Exception as exc:  # any decoder failure becomes one clear DataError
        raise decode_error(path, header, exc) from exc
    pixels = np.asarray(image, dtype=np.float32)
    if pixels.shape != (int(header.Rows), int(header.Columns)):
        raise DataError(
            f"{path}: decoded shape {pixels.shape} does not match Rows x Columns "
            f"{header.Rows} x {header.Columns}"
        )
    window = _window(header)
    if window is not None:
        low, high = window
        scaled = ScaleIntensityRange(low, high, 0.0, 1.0, clip=True)(pixels)
    else:
        scaled = ScaleIntensity(minv=0.0, maxv=1.0)(pixels)
    scaled = np.asarray(scaled, dtype=np.float32)
    if str(header.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        scaled = 1.0 - scaled
    return np.ascontiguousarray(scaled, dtype=np.float32)


def _window(header: pydicom.Dataset) -> tuple[float, float] | None:
    """(low, high) from WindowCenter / WindowWidth (rescaled units), or None when absent."""
    center, width = header.get("WindowCenter"), header.get("WindowWidth")
    if center is None or width is None:
        return None
    # Both may be multi-valued (several presets); the first one is the default view.
    center = float(center[0] if isinstance(center, pydicom.multival.MultiValue) else center)
    width = float(width[0] if isinstance(width, pydicom.multival.MultiValue) else width)
    if width <= 0:
        return None
    return center - width / 2.0, center + width / 2.0


def decode_error(path: Path, header: pydicom.Dataset, exc: Exception) -> DataError:
    """A DataError naming the file, its transfer syntax and the decoder packages it needs."""
    meta = getattr(header, "file_meta", None)
    syntax = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    if syntax is None:
        return DataError(f"{path}: pixel data could not be read ({type(exc).__name__}: {exc})")
    described = f"transfer syntax {syntax.name} ({syntax})"
    try:
        decoder = pydicom.pixels.get_decoder(syntax)
    except NotImplementedError:
        return DataError(f"{path}: {described} is not supported by pydicom")
    if not decoder.is_available:
        # pydicom lists e.g. "pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-openjpeg>=2.0".
        options = [dep.split(" - requires ", 1)[-1] for dep in decoder.missing_dependencies]
        hint = "; or ".join(f"install {option}" for option in options) or "no decoder known"
        return DataError(f"{path}: cannot decode pixel data with {described}: no decoder is "
                         f"installed ({hint})")
    return DataError(
        f"{path}: pixel data with {described} could not be decoded by "
        f"{', '.join(decoder.available_plugins)} ({type(exc).__name__}: {exc})"
    )
