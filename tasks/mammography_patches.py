"""Mammography on lesion-centred patches (``task=mammography task.view=patch``).

Whole films at 128-256 px hold too little of a lesion to learn from 226 films. Here every
simulated hospital cuts windows of ``task.patch.size`` pixels from its own films of
``task.dataset`` (``mias512``: 400 um per pixel):
- centred on each annotated lesion of ``mias_abnormalities.csv`` (the exact centre plus
  jittered copies; MONAI augmentation on top during training): label benign (1) or
  malignant (2);
- normal-tissue windows inside the breast (``tasks.patches.breast_mask``: not background,
  not the label marker), away from every lesion, on normal films and lesion-free regions of
  abnormal films: label normal (0).
Films whose findings have no coordinates (mdb216, mdb233, mdb245) give no patches. The raw
patch labels are those of the film task, so ``task.target`` (abnormal / malignancy) relabels
them the same way. The extraction is ``tasks.patches.extract_patches``, the function the
hospital's command ``scripts/extract_patches.py`` runs on its own films; in deployment a
SuperNode's data-path is that command's npz.

Films are dealt to sites exactly as in the film view (whole patients, the official val and
test splits matched to each site's training shares), so a patient's patches stay at one site
and in one split. Evaluation, per site and pooled:
- ``auc`` etc.: patch level, on the site's test patches;
- ``film_auc``: film level, on the site's whole test films: the patch model slid over the
  breast (step ``task.patch.stride``), film score = mean of the top ``task.patch.film_topk``
  window scores ("is this film abnormal?");
- ``intensity_auc``: the mean intensity of each test patch alone as the score, the brightness
  confound a lesion detector has to beat.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from tasks.base import DataError, SiteData, SiteRef
from tasks.engine import binary_auc
from tasks.image_data import SPLITS
from tasks.image_task import (
    ImageTaskSpec,
    _data_dir,
    load_image_site,
    make_site,
    metadata_column,
    preprocess,
    simulated_parts,
)
from tasks.patches import (
    Lesion,
    breast_mask,
    extract_patches,
    flip_lesions,
    sliding_centres,
    windows,
)
from tasks.score_groups import score_metrics

ABNORMALITIES = "mias_abnormalities.csv"
ORIGINAL_SIZE = 1024  # mini-MIAS coordinates are in 1024-pixel units, origin bottom-left
SEVERITY = {"B": 1, "M": 2}


@dataclass
class FilmSet:
    """A site's whole test films for film-level scores (kept at the site)."""

    films: np.ndarray  # uint8 (F, H, W)
    labels: np.ndarray  # int64 (F,) target labels
    centres: list[np.ndarray]  # sliding-window centres inside each film's breast
    size: int
    topk: int
    cfg: DictConfig  # for the task's preprocessing of the windows


def patch_settings(cfg: DictConfig) -> dict[str, Any]:
    """``task.patch`` as plain values, checked."""
    patch = cfg.task.patch
    values = {
        "size": int(patch.size), "normals_per_film": int(patch.normals_per_film),
        "lesion_copies": int(patch.lesion_copies), "jitter": float(patch.jitter),
        "eval_normals_per_film": int(patch.eval_normals_per_film),
        "eval_lesion_copies": int(patch.eval_lesion_copies), "stride": int(patch.stride),
        "film_topk": int(patch.film_topk),
    }
    for key in ("size", "lesion_copies", "eval_lesion_copies", "stride", "film_topk"):
        if values[key] < 1:
            raise DataError(f"task.patch.{key} must be >= 1, got {values[key]}")
    return values


def read_lesions(path: Path, scale: float) -> dict[str, list[Lesion] | None]:
    """Lesions per image id from ``mias_abnormalities.csv``, in film pixels of a film
    ``scale`` times the 1024-pixel original (row = (1024 - y) * scale, col = x * scale).

    An image with a finding but no coordinates maps to None.
    """
    if not path.is_file():
        raise DataError(f"{path}: lesion annotations do not exist (needed for task.view=patch)")
    found: dict[str, list[Lesion] | None] = {}
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = {"image_id", "severity", "x", "y", "radius"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
        for row in reader:
            image = row["image_id"]
            lesions = found.setdefault(image, [])
            severity = (row["severity"] or "").strip()
            if not severity:
                continue
            if severity not in SEVERITY:
                raise DataError(f"{path}, line {reader.line_num}: severity '{severity}' is not "
                                "B or M")
            if not (row["x"] or "").strip():
                found[image] = None  # spread finding without a centre
                continue
            if lesions is not None:
                lesions.append(Lesion((ORIGINAL_SIZE - float(row["y"])) * scale,
                                      float(row["x"]) * scale, float(row["radius"]) * scale,
                                      SEVERITY[severity]))
    return found


def load_patch_site(spec: ImageTaskSpec, cfg: DictConfig, site: SiteRef) -> SiteData:
    """One site's lesion / normal-tissue patches (train, val, test) and its test films."""
    if site.data_path is not None:  # the hospital's npz from scripts/extract_patches.py
        return load_image_site(spec, cfg, site)
    if site.index is None:
        raise DataError(f"site {site.name} has neither a partition-id nor a data-path")
    if str(cfg.task.dataset) not in spec.files:
        raise DataError(f"task.view=patch needs film annotations: use task.dataset=mias512 "
                        f"(or mias128/mias256), not '{cfg.task.dataset}'")
    settings = patch_settings(cfg)
    sites = simulated_parts(spec, cfg)
    index = site.index
    if index >= len(sites.parts["train"]):
        raise DataError(f"site index {index} is outside the {len(sites.parts['train'])} sites "
                        "of partition.num_sites")
    folder = _data_dir(cfg)
    width = int(sites.splits.train_images.shape[-1])
    lesions = read_lesions(folder / ABNORMALITIES, width / ORIGINAL_SIZE)
    sizes = {split: len(sites.splits.labels(split)) for split in SPLITS}
    ids = metadata_column(folder / "mias_metadata.csv", "image_id", sizes)
    flips = spec.flips(folder, str(cfg.task.dataset), sizes, cfg) or {}
    images, labels, patients, films = {}, {}, {}, {}
    for offset, split in enumerate(SPLITS):
        keep, idx = sites.kept[split].keep, sites.parts[split][index]
        film_ids = ids[split][keep][idx]
        flipped = flips.get(split, np.zeros(sizes[split], dtype=bool))[keep][idx]
        film_lesions = [flip_lesions(lesions.get(i, []), width) if f else lesions.get(i, [])
                        for i, f in zip(film_ids, flipped, strict=True)]
        train = split == "train"
        cut = extract_patches(
            sites.splits.images(split)[keep][idx], film_lesions, settings["size"],
            settings["normals_per_film" if train else "eval_normals_per_film"],
            settings["lesion_copies" if train else "eval_lesion_copies"],
            settings["jitter"], seed=int(cfg.seed) * 1000 + 10 * index + offset,
        )
        target = spec.relabel(cut.labels, cfg, f"{ABNORMALITIES} ({split} patches)")
        images[split], labels[split] = cut.images[target.keep], target.labels
        groups = sites.groups(split)
        patients[split] = None if groups is None else groups[idx][cut.film[target.keep]]
        films[split] = (sites.splits.images(split)[keep][idx], sites.kept[split].labels[idx])
    data = make_site(spec, cfg, site.name, images, labels,
                     augment_seed=int(cfg.seed) + 1000 * index, patients=patients)
    test_films, film_labels = films["test"]
    data.extras["films"] = FilmSet(
        test_films, film_labels,
        [sliding_centres(breast_mask(f), settings["size"], settings["stride"])
         for f in test_films],
        settings["size"], settings["film_topk"], cfg,
    )
    data.extras["test_intensity"] = images["test"].reshape(len(images["test"]), -1).mean(1) / 255.0
    data.info.update({"view": "patch", "patch_size": settings["size"],
                      "num_test_films": len(test_films)})
    return data


@torch.no_grad()
def film_scores(model: nn.Module, films: FilmSet, device: torch.device) -> np.ndarray:
    """Each film's score on the logit scale: the mean of the top-k window logits
    ``log p1/p0`` of the patch model slid across its breast (-1000: no breast window)."""
    model.to(device).eval()
    scores = np.full(len(films.films), -1000.0, dtype=np.float64)
    for i, (film, centres) in enumerate(zip(films.films, films.centres, strict=True)):
        if len(centres) == 0:
            continue
        logits = []
        for start in range(0, len(centres), 512):
            batch = preprocess(windows(film, centres[start:start + 512], films.size), films.cfg)
            out = model(batch.to(device)).to(torch.float64)
            logits.append((out[:, 1] - out[:, 0]).cpu().numpy())
        scores[i] = float(np.sort(np.concatenate(logits))[-films.topk:].mean())
    return scores


def patch_metrics(model: nn.Module, site: SiteData, device: torch.device) -> dict[str, Any]:
    """Film-level scores and the mean-intensity baseline of a patch site (none otherwise):
    the site's exact ``film_auc`` / ``intensity_auc`` and their k-patient score groups
    (prefixes ``film-`` / ``intensity-``) for the pooled values."""
    films: FilmSet | None = site.extras.get("films")
    if films is None:
        return {}
    score = film_scores(model, films, device)
    intensity = site.extras["test_intensity"]
    test_labels = site.test.labels.numpy()
    out: dict[str, Any] = {
        "film_auc": binary_auc(films.labels, score),
        "film-num-examples": len(films.labels),
        "intensity_auc": binary_auc(test_labels, intensity),
        "intensity-num-examples": len(test_labels),
    }
    out |= {f"film-{k}": v for k, v in score_metrics(films.labels, score).items()}
    out |= {f"intensity-{k}": v for k, v in score_metrics(test_labels, intensity).items()}
    return out
