"""Convert a hospital's images (DICOM / PNG / JPEG / PGM) + labels CSV into a MedMNIST npz.

A hospital runs this once; the imaging tasks then read the npz like the public sets:

    python scripts/prepare_images.py /data/cxr --labels /data/cxr/labels.csv \\
        --output /data/cxr_64.npz --size 64 --classes normal,pneumonia --seed 42

Input: ``labels.csv`` with header ``path,label[,patient_id][,split]`` (paths relative to the
CSV), or class sub-folders under the input folder (see ``tasks.image_data.load_folder``).
Output (both written atomically):
- ``OUTPUT.npz``: ``{train,val,test}_images`` uint8 (N, size, size) grayscale and
  ``{split}_labels`` uint8 (N, 1), the MedMNIST layout ``tasks.image_data.load_npz`` reads;
- ``OUTPUT_metadata.csv``: one row per image in npz order (split, index_in_split, path, label,
  label_name, patient_id), so patient-level partitioning can find each image's patient.
The split is patient-level (no patient in two splits), label-stratified and seeded
(``tasks.partition.split_by_patient``), unless the CSV has a ``split`` column, which is kept
as given (and checked to be patient-level). Without ``patient_id`` every image is its own patient.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from fl_app.run_folder import atomic_write_bytes, atomic_write_text
from tasks.base import DataError
from tasks.image_data import SPLITS, ImageSet, assign_splits, load_folder


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description="Convert DICOM/PNG/JPEG images + labels CSV into a MedMNIST-layout npz."
    )
    parser.add_argument("input", type=Path, help="folder holding the images (or class sub-folders)")
    parser.add_argument("--labels", type=Path, default=None,
                        help="CSV path,label[,patient_id][,split] (default: INPUT/labels.csv or "
                             "INPUT/manifest.csv if present, else class sub-folders)")
    parser.add_argument("--output", type=Path, required=True, help="npz file to write")
    parser.add_argument("--size", type=int, default=64, help="output side length in pixels")
    parser.add_argument("--classes", type=str, default=None,
                        help="comma-separated class names in label order (default: sorted names, "
                             "or integer labels as they are)")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    if args.size < 1:
        parser.error("--size must be >= 1")
    return args


def to_npz_bytes(data: ImageSet, parts: dict[str, np.ndarray]) -> bytes:
    """The MedMNIST arrays (uint8 images, uint8 (N, 1) labels) as compressed npz bytes."""
    label_dtype = np.uint8 if len(data.classes) <= 256 else np.int64
    arrays = {}
    for split in SPLITS:
        idx = parts[split]
        images = np.round(data.images[idx, 0] * 255.0).clip(0, 255).astype(np.uint8)
        arrays[f"{split}_images"] = images
        arrays[f"{split}_labels"] = data.labels[idx].astype(label_dtype).reshape(-1, 1)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def metadata_csv(data: ImageSet, parts: dict[str, np.ndarray], root: Path) -> str:
    """One CSV row per image in npz order: split, index_in_split, path, label, patient_id."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["split", "index_in_split", "path", "label", "label_name", "patient_id"])
    for split in SPLITS:
        for position, i in enumerate(parts[split]):
            path = Path(data.paths[i]).resolve()
            shown = path.relative_to(root) if path.is_relative_to(root) else path
            writer.writerow([split, position, shown.as_posix(), int(data.labels[i]),
                             data.classes[data.labels[i]],
                             data.patient_ids[i] if data.patient_ids else ""])
    return out.getvalue()


def summary(data: ImageSet, parts: dict[str, np.ndarray], output: Path, size: int) -> str:
    """Human-readable summary: images, patients and class counts per split."""
    lines = [f"wrote {output} ({size}x{size}, classes {data.classes})"]
    for split in SPLITS:
        idx = parts[split]
        counts = Counter(int(data.labels[i]) for i in idx)
        patients = len({data.patient_ids[i] for i in idx}) if data.patient_ids else len(idx)
        per_class = " ".join(f"{data.classes[c]}:{counts.get(c, 0)}"
                             for c in range(len(data.classes)))
        lines.append(f"  {split:5s} {len(idx):6d} images {patients:6d} patients  {per_class}")
    if not data.patient_ids:
        lines.append("  note: no patient_id column, so every image counts as its own patient")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the conversion; returns the exit status (2 for bad input, with a one-line reason)."""
    args = parse_args(argv)
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    try:
        data = load_folder(args.input, manifest=args.labels, classes=classes, size=args.size)
        parts = assign_splits(data, args.val_fraction, args.test_fraction, args.seed)
        payload = to_npz_bytes(data, parts)
    except (DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    output = args.output
    if output.suffix != ".npz":
        output = output.with_name(output.name + ".npz")
    root = (args.labels.parent if args.labels else args.input).resolve()
    atomic_write_bytes(output, payload)
    atomic_write_text(output.with_name(output.stem + "_metadata.csv"),
                      metadata_csv(data, parts, root))
    print(summary(data, parts, output, args.size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
