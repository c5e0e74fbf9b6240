"""Lesion-centred and normal-tissue patches of film mammograms, and sliding windows over a film.

A whole mammogram at 128-256 px holds too little of a lesion for a network to learn from 226
films; a window centred on the annotated lesion at full resolution does. This module is the
pure-numpy geometry shared by the mammography task (``task.view=patch``) and the hospital's
extraction command (``scripts/extract_patches.py``):

- ``breast_mask``: the breast region of a film (largest bright connected region, holes
  filled), which excludes the dark background and the film's label marker;
- ``lesion_centres`` / ``normal_centres``: where training and test windows go: on each
  annotated lesion (plus jittered copies), and inside the breast away from every lesion;
- ``windows``: the (size x size) windows at those centres (zero outside the film);
- ``sliding_centres``: a regular grid of centres inside the breast, for film-level scoring.

Coordinates are (row, column) in the film's own pixels, row 0 at the top.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

# A film pixel (0-255, after light smoothing) brighter than this is tissue, not background.
TISSUE_LEVEL = 30.0


@dataclass(frozen=True)
class Lesion:
    """One annotated lesion: centre (row, col), radius in film pixels, raw label (1/2)."""

    row: float
    col: float
    radius: float
    label: int


def breast_mask(film: np.ndarray, level: float = TISSUE_LEVEL) -> np.ndarray:
    """Boolean mask of the breast: the largest connected region brighter than ``level``.

    Smaller bright regions (the film's label marker, scanner artefacts) are dropped; holes
    (dark fatty tissue inside the breast) are filled.
    """
    smooth = ndimage.uniform_filter(np.asarray(film, dtype=np.float32), size=5)
    bright = smooth > level
    labels, count = ndimage.label(bright)
    if count == 0:
        return np.zeros(film.shape, dtype=bool)
    sizes = ndimage.sum_labels(bright, labels, index=np.arange(1, count + 1))
    return ndimage.binary_fill_holes(labels == int(np.argmax(sizes)) + 1)


def lesion_centres(
    lesion: Lesion, copies: int, jitter: float, rng: np.random.Generator
) -> np.ndarray:
    """``copies`` centres on ``lesion``: the exact centre, then copies shifted by up to
    ``jitter`` pixels (capped at the radius, so the lesion stays in the middle)."""
    shift = min(float(jitter), max(float(lesion.radius), 1.0))
    centres = [(lesion.row, lesion.col)]
    for _ in range(max(copies, 1) - 1):
        dr, dc = rng.uniform(-shift, shift, size=2)
        centres.append((lesion.row + dr, lesion.col + dc))
    return np.round(np.asarray(centres)).astype(np.int64)


def normal_centres(
    mask: np.ndarray, lesions: Sequence[Lesion], count: int, size: int,
    rng: np.random.Generator, min_inside: float = 0.75,
) -> np.ndarray:
    """Up to ``count`` centres of normal-tissue windows of ``size`` on one film.

    A centre qualifies when at least ``min_inside`` of its window lies inside the breast
    ``mask`` and the window does not touch any lesion's bounding square.
    """
    if count <= 0:
        return np.zeros((0, 2), dtype=np.int64)
    ok = (inside_fraction(mask, size) >= min_inside) & mask
    half = size / 2.0
    rows, cols = np.indices(mask.shape)
    for lesion in lesions:
        reach = half + lesion.radius
        ok &= ~((np.abs(rows - lesion.row) < reach) & (np.abs(cols - lesion.col) < reach))
    candidates = np.flatnonzero(ok)
    if len(candidates) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    picked = rng.choice(candidates, size=min(count, len(candidates)), replace=False)
    return np.stack(np.unravel_index(np.sort(picked), mask.shape), axis=1).astype(np.int64)


def inside_fraction(mask: np.ndarray, size: int) -> np.ndarray:
    """For every pixel, the fraction of the ``size`` window centred there inside ``mask``."""
    return ndimage.uniform_filter(mask.astype(np.float32), size=size, mode="constant")


def sliding_centres(
    mask: np.ndarray, size: int, stride: int, min_inside: float = 0.75
) -> np.ndarray:
    """Centres of a regular grid (step ``stride``) whose window lies at least ``min_inside``
    inside ``mask``: the same rule as the normal-tissue training windows, so the film-level
    scan sees no window the model never saw the like of (e.g. mostly background)."""
    inside = inside_fraction(mask, size)
    offset = size // 2
    grid_r = np.arange(offset % stride, mask.shape[0], stride)
    grid_c = np.arange(offset % stride, mask.shape[1], stride)
    rr, cc = np.meshgrid(grid_r, grid_c, indexing="ij")
    keep = (inside[rr, cc] >= min_inside) & mask[rr, cc]
    return np.stack([rr[keep], cc[keep]], axis=1).astype(np.int64)


def windows(film: np.ndarray, centres: np.ndarray, size: int) -> np.ndarray:
    """The ``size`` x ``size`` windows of ``film`` centred at ``centres`` (zero-padded)."""
    pad = size
    padded = np.pad(film, pad, mode="constant")
    out = np.empty((len(centres), size, size), dtype=film.dtype)
    for i, (row, col) in enumerate(np.asarray(centres, dtype=np.int64)):
        top, left = row - size // 2 + pad, col - size // 2 + pad
        out[i] = padded[top:top + size, left:left + size]
    return out


@dataclass
class FilmPatches:
    """Patches cut from a set of films: pixels, raw labels (0 normal, 1 benign, 2 malignant),
    the film each came from, its centre, and its kind (``lesion`` / ``normal``)."""

    images: np.ndarray  # uint8 (N, size, size)
    labels: np.ndarray  # int64 (N,)
    film: np.ndarray  # int64 (N,) index of the source film
    centres: np.ndarray  # int64 (N, 2)
    kinds: np.ndarray  # str (N,)


def extract_patches(
    films: np.ndarray, lesions: Sequence[Sequence[Lesion] | None], size: int,
    normals_per_film: int, lesion_copies: int, jitter: float, seed: int,
) -> FilmPatches:
    """Lesion and normal-tissue patches of every film.

    ``lesions[i]`` lists film ``i``'s annotated lesions: an empty list for a normal film,
    None for an abnormal film whose findings have no coordinates (it gives no patches: its
    "normal" tissue might hold the unlocated lesion). Deterministic per ``seed``.
    """
    rng = np.random.default_rng(seed)
    images, labels, film_of, centres, kinds = [], [], [], [], []
    for index, (film, found) in enumerate(zip(films, lesions, strict=True)):
        if found is None:
            continue
        for lesion in found:
            at = lesion_centres(lesion, lesion_copies, jitter, rng)
            images.append(windows(film, at, size))
            labels += [lesion.label] * len(at)
            centres.append(at)
            kinds += ["lesion"] * len(at)
            film_of += [index] * len(at)
        at = normal_centres(breast_mask(film), found, normals_per_film, size, rng)
        images.append(windows(film, at, size))
        labels += [0] * len(at)
        centres.append(at)
        kinds += ["normal"] * len(at)
        film_of += [index] * len(at)
    if not images:
        return FilmPatches(np.zeros((0, size, size), np.uint8), np.zeros(0, np.int64),
                           np.zeros(0, np.int64), np.zeros((0, 2), np.int64), np.zeros(0, str))
    return FilmPatches(
        np.concatenate(images).astype(np.uint8), np.asarray(labels, dtype=np.int64),
        np.asarray(film_of, dtype=np.int64), np.concatenate(centres),
        np.asarray(kinds),
    )


def flip_lesions(lesions: Sequence[Lesion] | None, width: int) -> list[Lesion] | None:
    """The lesions of a film flipped left-right (column -> width - 1 - column)."""
    if lesions is None:
        return None
    return [Lesion(les.row, width - 1 - les.col, les.radius, les.label) for les in lesions]
