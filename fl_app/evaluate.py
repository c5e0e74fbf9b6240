"""External validation: a trained imaging model on another hospital's data.

    python -m fl_app.evaluate <run folder> <data> [--split test] [--name NAME]

``<data>`` is a MedMNIST-layout ``.npz`` (e.g. from scripts/prepare_images.py or
scripts/extract_patches.py), or a folder of PNG / JPEG / DICOM images with a labels CSV
(``manifest.csv`` / ``labels.csv``: ``path,label[,patient_id][,split]``) or class sub-folders.
All its images form one test pool unless ``--split`` picks one split (npz: train / val / test;
folder: the CSV's ``split`` column). The run's own config does the rest: the same target
relabelling, the same preprocessing (``task.image_size``, ``task.intensity``) and the run's
operating threshold (summary.json ``threshold``, see fl_app.threshold).

It prints and writes to ``<run folder>/external/<name>.json``: AUC with a 95% bootstrap
confidence interval, accuracy, sensitivity and specificity at the run's threshold, and
calibration (expected calibration error over equal-width probability bins), with the
reliability diagram in ``<run folder>/external/<name>_reliability.png``, and adds them to the
run report (``report.md``, section "External validation").

In deployment a hospital runs the same command on its SuperNode's own data (its data-path)
with the consortium's run folder (or a copy of it): the images never leave the hospital.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from fl_app.config import ConfigError
from fl_app.plots import plot_reliability
from fl_app.report import report_quietly
from fl_app.run_folder import RunFolder
from tasks import TASK_MODULES, DataError, engine, get_task
from tasks.image_data import SPLITS, load_folder, load_npz
from tasks.image_task import ImageTaskSpec, preprocess
from tasks.image_transforms import ImageDataset

BOOTSTRAP = 1000
CALIBRATION_BINS = 10


def load_run(run_dir: Path) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """(config, summary.json, model facts) of a finished run folder; DataError if incomplete."""
    for name in ("config.yaml", "summary.json", "final_model.pt"):
        if not (run_dir / name).is_file():
            raise DataError(f"{run_dir}: not a finished run folder (no {name})")
    cfg = OmegaConf.load(run_dir / "config.yaml")
    summary = json.loads((run_dir / "summary.json").read_text())
    sites = run_dir / "sites.json"
    info = json.loads(sites.read_text()).get("model_info") if sites.is_file() else None
    return cfg, summary, info or {}


def image_spec(cfg: Any) -> ImageTaskSpec:
    """The imaging spec of the run's task; DataError for a task that is not an imaging one."""
    name = str(cfg.task.name)
    spec = getattr(importlib.import_module(TASK_MODULES[name]), "SPEC", None) \
        if name in TASK_MODULES else None
    if not isinstance(spec, ImageTaskSpec):
        raise DataError(f"fl_app.evaluate validates imaging runs; this run is task '{name}'")
    return spec


def trained_size(cfg: Any, info: dict[str, Any], spec: ImageTaskSpec) -> int | None:
    """The image size the model was trained on: sites.json's model facts, else the run's
    ``task.image_size``, else the stored size of the run's own data set file."""
    if info.get("image_size"):
        return int(info["image_size"])
    if cfg.task.get("image_size"):
        return int(cfg.task.image_size)
    dataset, folder = str(cfg.task.get("dataset")), cfg.task.get("data_dir")
    if dataset in spec.files and folder and (Path(folder) / spec.files[dataset]).is_file():
        with np.load(Path(folder) / spec.files[dataset]) as data:
            return int(data["test_images"].shape[2])
    return None


def load_external(path: Path, cfg: Any, split: str | None) -> tuple[np.ndarray, np.ndarray]:
    """All images (or one ``split``) and raw labels of an npz file or an image folder."""
    if split is not None and split not in SPLITS:
        raise DataError(f"--split must be one of {', '.join(SPLITS)}, got '{split}'")
    if path.is_file():
        if path.suffix.lower() != ".npz":
            raise DataError(f"{path}: external data must be a MedMNIST-layout .npz file or a "
                            "folder of images")
        data = load_npz(path)
        chosen = [split] if split else list(SPLITS)
        return (np.concatenate([data[f"{s}_images"] for s in chosen]),
                np.concatenate([data[f"{s}_labels"] for s in chosen]))
    if not path.is_dir():
        raise DataError(f"{path}: no such file or folder")
    classes = cfg.task.get("classes")
    size = cfg.task.get("image_size")
    images = load_folder(path, classes=[str(c) for c in classes] if classes else None,
                         size=None if size is None else int(size))
    keep = np.ones(len(images), dtype=bool)
    if split is not None:
        if images.splits is None:
            raise DataError(f"{path}: --split {split} needs a 'split' column in the labels CSV")
        keep = np.asarray(images.splits) == split
    return images.images[keep, 0], images.labels[keep]


def bootstrap_auc(labels: np.ndarray, scores: np.ndarray, rounds: int = BOOTSTRAP,
                  seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the AUC (resamples holding one class skipped)."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(rounds):
        idx = rng.integers(0, len(labels), len(labels))
        auc = engine.binary_auc(labels[idx], scores[idx])
        if not math.isnan(auc):
            values.append(auc)
    if not values:
        return math.nan, math.nan
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def calibration(labels: np.ndarray, scores: np.ndarray, bins: int = CALIBRATION_BINS
                ) -> tuple[float, list[dict[str, float]]]:
    """Expected calibration error of P(positive) over ``bins`` equal-width bins, and the bins."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(scores, edges[1:-1]), 0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        inside = which == b
        count = int(inside.sum())
        mean_score = float(scores[inside].mean()) if count else math.nan
        observed = float(labels[inside].mean()) if count else math.nan
        if count:
            ece += count / len(labels) * abs(observed - mean_score)
        table.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": count,
                      "mean_score": mean_score, "fraction_positive": observed})
    return float(ece), table


def evaluate_external(run_dir: Path, data: Path, split: str | None = None,
                      name: str | None = None) -> dict[str, Any]:
    """Evaluate the run's final model on ``data``; write and return the external report."""
    run_dir, data = Path(run_dir), Path(data)
    cfg, summary, info = load_run(run_dir)
    spec = image_spec(cfg)
    images, raw = load_external(data, cfg, split)
    if len(raw) == 0:
        raise DataError(f"{data}: no images{f' in split {split}' if split else ''}")
    kept = spec.relabel(raw, cfg, str(data))  # a label of another task fails here, by name
    prepared = preprocess(images[kept.keep], cfg)
    expected = trained_size(cfg, info, spec)
    if expected is not None and int(prepared.shape[-1]) != int(expected):
        raise DataError(
            f"{data}: images are {prepared.shape[-1]}x{prepared.shape[-2]} after the run's "
            f"preprocessing but the model was trained on {expected}x{expected}; convert them "
            f"at that size (scripts/prepare_images.py --size {expected})"
        )
    task = get_task(str(cfg.task.name))
    model = task.build_model(cfg, info or {"image_size": int(prepared.shape[-1]),
                                           "num_classes": len(spec.classes(cfg))})
    model.load_state_dict(torch.load(run_dir / "final_model.pt", map_location="cpu"))
    labels, logits = _logits(model, ImageDataset(prepared, kept.labels))
    if logits.shape[1] != 2:
        raise DataError("fl_app.evaluate reports binary metrics; this run has "
                        f"{logits.shape[1]} classes")
    scores = logits[:, 1] - logits[:, 0]  # log p1/p0, as the sites score (tasks.score_groups)
    probability = 1.0 / (1.0 + np.exp(-scores))
    cut = summary.get("threshold_logit")
    cut = 0.0 if cut is None else float(cut)  # none: argmax, p >= 0.5
    predicted = (scores >= cut).astype(np.int64)
    pos, neg = labels == 1, labels == 0
    low, high = bootstrap_auc(labels, scores, seed=int(cfg.seed))
    ece, bins = calibration(labels, probability)
    name = name or (data.stem if data.is_file() else data.name)
    report = {
        "run": str(run_dir), "data": str(data), "split": split or "all",
        "classes": spec.classes(cfg), "num-examples": len(labels),
        "num-positive": int(pos.sum()), "auc": engine.binary_auc(labels, scores),
        "auc_ci95": [low, high], "threshold": float(1.0 / (1.0 + np.exp(-cut))),
        "threshold_logit": cut,
        "threshold_rule": summary.get("threshold_rule"),
        "accuracy": float((predicted == labels).mean()),
        "sensitivity": float((predicted[pos] == 1).mean()) if pos.any() else math.nan,
        "specificity": float((predicted[neg] == 0).mean()) if neg.any() else math.nan,
        "ece": ece, "calibration_bins": bins,
        "reliability_png": f"external/{name}_reliability.png",
        "report_json": f"external/{name}.json",
    }
    folder = RunFolder(run_dir)
    folder.write_json(f"external/{name}.json", report)
    plot_reliability(bins, run_dir / "external" / f"{name}_reliability.png",
                     f"{cfg.task.name} on {name} (ECE {ece:.3f})")
    report_quietly(run_dir)  # report.md gains an "External validation" section
    return report


@torch.no_grad()
def _logits(model: torch.nn.Module, data: ImageDataset) -> tuple[np.ndarray, np.ndarray]:
    """Labels and float64 logits of the model over ``data`` (CPU)."""
    model.eval()
    labels, logits = [], []
    for x, y in engine.make_loader(data, 256, False, 0):
        logits.append(model(x).to(torch.float64).numpy())
        labels.append(y.numpy())
    return np.concatenate(labels), np.concatenate(logits)


def main(argv: list[str] | None = None) -> int:
    """``python -m fl_app.evaluate RUN DATA``: print the report; 2 with one line on bad input."""
    parser = argparse.ArgumentParser(prog="python -m fl_app.evaluate",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="run folder of a finished imaging run")
    parser.add_argument("data", type=Path, help="npz file or image folder (labels CSV / "
                        "class sub-folders; PNG, JPEG or DICOM)")
    parser.add_argument("--split", default=None, help="evaluate one split only (default: all)")
    parser.add_argument("--name", default=None, help="report name (default: the data's name)")
    args = parser.parse_args(argv)
    try:
        report = evaluate_external(args.run, args.data, args.split, args.name)
    except (DataError, ConfigError, ValueError) as err:
        print(f"fedclinic evaluate: error: {err}", file=sys.stderr)
        return 2
    low, high = report["auc_ci95"]
    print(f"{report['data']} ({report['split']}): {report['num-examples']} images, "
          f"{report['num-positive']} positive")
    print(f"  AUC {report['auc']:.4f} (95% CI {low:.4f}-{high:.4f})")
    print(f"  at threshold {report['threshold']:.4f}: accuracy {report['accuracy']:.4f}  "
          f"sensitivity {report['sensitivity']:.4f}  specificity {report['specificity']:.4f}")
    print(f"  calibration: ECE {report['ece']:.4f} ({report['reliability_png']})")
    print(f"  written: {report['report_json']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
