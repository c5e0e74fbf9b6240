"""Cut lesion-centred and normal-tissue patches from a hospital's mammograms into a MedMNIST npz.

The hospital's data-preparation step for ``task=mammography task.view=patch``, run once on its
own films and lesion annotations; the SuperNode's data-path is then the npz it writes:

    python scripts/extract_patches.py /data/mammo/annotations.csv \\
        --output /data/mammo_patches.npz --film-size 512 --size 64 --origin top-left

Input: a CSV with header ``image,x,y,radius,label[,patient_id][,split]``, one row per lesion
(paths relative to the CSV; PNG / JPEG / PGM / TIFF / DICOM films). ``label`` is ``normal``,
``benign`` or ``malignant`` (or 0 / 1 / 2); a normal film has one row with empty x, y and
radius; a finding without coordinates (e.g. spread calcifications) gives no patches. ``x`` is
the column and ``y`` the row of the lesion centre, and ``radius`` its radius, in pixels of the
film as stored; ``--origin bottom-left`` counts ``y`` from the bottom edge (mini-MIAS's
convention). ``--film-size`` resizes every film (area averaging) and scales the coordinates.
Output (written atomically), the conventions of ``scripts/prepare_images.py``:
- ``OUTPUT.npz``: ``{train,val,test}_images`` uint8 (N, size, size), ``{split}_labels`` uint8
  (N, 1) with 0 = normal tissue, 1 = benign lesion, 2 = malignant lesion;
- ``OUTPUT_metadata.csv``: one row per patch in npz order (split, index_in_split, image,
  patient_id, kind, row, col, label, label_name).
The split is by film and patient-level (``tasks.image_data.assign_splits``, as in
prepare_images): every patch of a patient lands in one split. The windows are cut by
``tasks.patches.extract_patches``, the same code the task runs on the shipped mini-MIAS films.
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
from tasks.image_data import SPLITS, ImageSet, assign_splits, load_image
from tasks.patches import Lesion, extract_patches

CLASSES = ("normal", "benign", "malignant")
COLUMNS = ("image", "x", "y", "radius", "label")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("annotations", type=Path,
                        help="CSV image,x,y,radius,label[,patient_id][,split]")
    parser.add_argument("--output", type=Path, required=True, help="npz file to write")
    parser.add_argument("--size", type=int, default=64, help="patch side in film pixels")
    parser.add_argument("--film-size", type=int, default=None,
                        help="resize films to this side first (coordinates are scaled)")
    parser.add_argument("--origin", choices=("top-left", "bottom-left"), default="top-left",
                        help="where y counts from (mini-MIAS: bottom-left)")
    parser.add_argument("--normals-per-film", type=int, default=4,
                        help="normal-tissue windows per training film")
    parser.add_argument("--lesion-copies", type=int, default=8,
                        help="training windows per lesion (centre + jittered copies)")
    parser.add_argument("--jitter", type=float, default=8.0, help="max jitter, pixels")
    parser.add_argument("--eval-normals-per-film", type=int, default=8)
    parser.add_argument("--eval-lesion-copies", type=int, default=4)
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    if args.size < 4:
        parser.error("--size must be >= 4")
    return args


def _label(text: str, where: str) -> int:
    text = text.strip().lower()
    if text in CLASSES:
        return CLASSES.index(text)
    if text in ("0", "1", "2"):
        return int(text)
    raise DataError(f"{where}: label '{text}' is not one of {', '.join(CLASSES)} (or 0/1/2)")


def read_annotations(path: Path) -> tuple[list[str], dict[str, dict]]:
    """Films in first-seen order, each with its rows' lesions, label, patient id and split."""
    if not path.is_file():
        raise DataError(f"{path}: annotations CSV does not exist")
    films: dict[str, dict] = {}
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(missing)} (header must be "
                            f"{','.join(COLUMNS)}[,patient_id][,split])")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            image = (row["image"] or "").strip()
            if not image:
                raise DataError(f"{where}: empty image")
            label = _label(row["label"] or "", where)
            film = films.setdefault(image, {"lesions": [], "label": 0, "where": where,
                                            "patient": (row.get("patient_id") or "").strip()
                                            or image,
                                            "split": (row.get("split") or "").strip() or None})
            film["label"] = max(film["label"], label)
            coords = [(row[c] or "").strip() for c in ("x", "y", "radius")]
            if label == 0:
                continue
            if not all(coords):
                film["lesions"] = None  # a finding without a centre: no patches from this film
            elif film["lesions"] is not None:
                try:
                    x, y, radius = (float(c) for c in coords)
                except ValueError:
                    raise DataError(f"{where}: x, y and radius must be numbers") from None
                film["lesions"].append((x, y, radius, label))
    if not films:
        raise DataError(f"{path}: no films listed")
    return list(films), films


def load_films(root: Path, names: list[str], films: dict[str, dict], film_size: int | None,
               origin: str) -> tuple[np.ndarray, list[list[Lesion] | None]]:
    """Every film as uint8 (N, S, S) and its lesions in the stored film's pixels."""
    pixels, lesions = [], []
    for name in names:
        film = films[name]
        path = Path(name) if Path(name).is_absolute() else root / name
        try:
            original = load_image(path)
            image = load_image(path, film_size) if film_size else original
        except DataError as exc:
            raise DataError(f"{film['where']}: {exc}") from exc
        height, width = original.shape
        scale_r, scale_c = image.shape[0] / height, image.shape[1] / width
        pixels.append(np.round(image * 255.0).clip(0, 255).astype(np.uint8))
        if film["lesions"] is None:
            lesions.append(None)
            continue
        found = []
        for x, y, radius, label in film["lesions"]:
            row = (height - y) if origin == "bottom-left" else y
            found.append(Lesion(row * scale_r, x * scale_c, radius * scale_c, label))
        lesions.append(found)
    shapes = {p.shape for p in pixels}
    if len(shapes) > 1:
        raise DataError(f"films differ in size ({sorted(shapes)}); pass --film-size")
    return np.stack(pixels), lesions


def main(argv: list[str] | None = None) -> int:
    """Run the extraction; returns the exit status (2 for bad input, with a one-line reason)."""
    args = parse_args(argv)
    try:
        names, films = read_annotations(args.annotations)
        pixels, lesions = load_films(args.annotations.parent, names, films, args.film_size,
                                     args.origin)
        index = ImageSet(np.zeros((len(names), 1, 1, 1), np.float32),
                         np.asarray([films[n]["label"] for n in names], dtype=np.int64),
                         names, list(CLASSES), [films[n]["patient"] for n in names],
                         [films[n]["split"] or "" for n in names]
                         if any(films[n]["split"] for n in names) else None)
        parts = assign_splits(index, args.val_fraction, args.test_fraction, args.seed)
    except (DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    arrays, meta = {}, io.StringIO()
    writer = csv.writer(meta, lineterminator="\n")
    writer.writerow(["split", "index_in_split", "image", "patient_id", "kind", "row", "col",
                     "label", "label_name"])
    lines = [f"wrote {args.output} ({args.size}x{args.size} patches)"]
    for offset, split in enumerate(SPLITS):
        idx = parts[split]
        train = split == "train"
        cut = extract_patches(
            pixels[idx], [lesions[i] for i in idx], args.size,
            args.normals_per_film if train else args.eval_normals_per_film,
            args.lesion_copies if train else args.eval_lesion_copies, args.jitter,
            seed=args.seed * 1000 + offset,
        )
        arrays[f"{split}_images"] = cut.images
        arrays[f"{split}_labels"] = cut.labels.astype(np.uint8).reshape(-1, 1)
        for position in range(len(cut.labels)):
            film = names[idx[cut.film[position]]]
            writer.writerow([split, position, film, films[film]["patient"], cut.kinds[position],
                             int(cut.centres[position][0]), int(cut.centres[position][1]),
                             int(cut.labels[position]), CLASSES[cut.labels[position]]])
        counts = Counter(cut.labels.tolist())
        lines.append(f"  {split:5s} {len(idx):5d} films {len(cut.labels):6d} patches  "
                     + " ".join(f"{c}:{counts.get(i, 0)}" for i, c in enumerate(CLASSES)))
    skipped = [n for n, found in zip(names, lesions, strict=True) if found is None]
    if skipped:
        lines.append(f"  {len(skipped)} film(s) with a finding but no coordinates gave no "
                     f"patches: {', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}")
    output = args.output if args.output.suffix == ".npz" else args.output.with_suffix(".npz")
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    atomic_write_bytes(output, buffer.getvalue())
    atomic_write_text(output.with_name(output.stem + "_metadata.csv"), meta.getvalue())
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
