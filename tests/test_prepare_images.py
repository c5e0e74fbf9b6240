"""scripts/prepare_images.py end to end on real JPEG, PNG/PGM and DICOM files."""

from __future__ import annotations

import csv
import importlib.util
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from tasks.image_data import load_image, load_npz

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "prepare_images.py"


def _script():
    spec = importlib.util.spec_from_file_location("prepare_images", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _hospital_folder(shared_data: Path, folder: Path) -> Path:
    """12 real images of 9 patients in mixed formats, and their labels.csv."""
    rows = []
    cxr = shared_data / "chest_xray" / "samples"
    (folder / "cxr").mkdir(parents=True)
    for name, label, patient in (
        ("kermany_test_NORMAL_IM-0001-0001.jpeg", "normal", "IM-0001"),
        ("kermany_test_PNEUMONIA_person1_virus_6.jpeg", "abnormal", "person1"),
        ("kermany_test_PNEUMONIA_person100_bacteria_477.jpeg", "abnormal", "person100"),
    ):
        shutil.copy(cxr / name, folder / "cxr" / name)
        rows.append((f"cxr/{name}", label, patient))
    # Each film twice (PGM original + lossless PNG): identical pixels of one patient, the kind
    # of duplicate that leaks between train and test when a split ignores patients.
    (folder / "films").mkdir()
    for image_id, label, patient in (("mdb001", "abnormal", "P001"), ("mdb003", "normal", "P002"),
                                     ("mdb023", "abnormal", "P012")):
        for suffix in (".pgm", ".png"):
            shutil.copy(shared_data / "mammography" / "samples" / f"{image_id}{suffix}",
                        folder / "films" / f"{image_id}{suffix}")
            rows.append((f"films/{image_id}{suffix}", label, patient))
    (folder / "dicom").mkdir()
    for name, label, patient in (
        ("nih_cxr14_DX_no_finding.dcm", "normal", "Covid0000"),
        ("nema_wg04_RG1_chest_CR_4x_uncompressed.dcm", "abnormal", "RG1"),
        ("pydicom_CT_small.dcm", "normal", "CT1"),
    ):
        shutil.copy(shared_data / "dicom" / name, folder / "dicom" / name)
        rows.append((f"dicom/{name}", label, patient))
    labels = folder / "labels.csv"
    with labels.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "patient_id"])
        writer.writerows(rows)
    return labels


def test_prepare_images_cli_end_to_end(shared_data, tmp_path):
    labels = _hospital_folder(shared_data, tmp_path / "hospital")
    output = tmp_path / "out" / "hospital_32.npz"
    command = [sys.executable, str(SCRIPT), str(tmp_path / "hospital"), "--labels", str(labels),
               "--output", str(output), "--size", "32", "--classes", "normal,abnormal",
               "--val-fraction", "0.2", "--test-fraction", "0.2", "--seed", "5"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert f"wrote {output}" in result.stdout
    assert "train" in result.stdout and "patients" in result.stdout

    data = load_npz(output)
    with np.load(output) as raw:  # the MedMNIST storage types
        assert raw["train_images"].dtype == np.uint8 and raw["train_labels"].shape[1:] == (1,)
    meta_path = output.with_name("hospital_32_metadata.csv")
    with meta_path.open(newline="") as handle:
        meta = list(csv.DictReader(handle))
    assert len(meta) == 12 == sum(len(data[f"{s}_labels"]) for s in ("train", "val", "test"))
    splits_of: dict[str, set[str]] = defaultdict(set)
    for row in meta:
        split, index = row["split"], int(row["index_in_split"])
        image = data[f"{split}_images"][index]
        assert image.shape == (32, 32) and image.dtype == np.uint8
        assert data[f"{split}_labels"][index] == int(row["label"])
        assert row["label_name"] == ("normal", "abnormal")[int(row["label"])]
        # Each row holds its own file, loaded and resized the same way (orientation kept).
        expected = np.round(load_image(tmp_path / "hospital" / row["path"], 32) * 255.0)
        assert np.abs(image.astype(float) - expected).max() <= 1.0, row["path"]
        splits_of[row["patient_id"]].add(split)
    assert all(len(s) == 1 for s in splits_of.values())  # patient-level split
    assert len(splits_of) == 9
    # 4 normal + 5 abnormal patients: round(0.2 n) = 1 val and 1 test patient per label.
    per_split = defaultdict(set)
    for patient, (split,) in splits_of.items():
        per_split[split].add(patient)
    assert [len(per_split[s]) for s in ("train", "val", "test")] == [5, 2, 2]


def test_prepare_images_is_seeded_and_keeps_given_splits(shared_data, tmp_path):
    script = _script()
    labels = _hospital_folder(shared_data, tmp_path / "h")
    outs = []
    for name, seed in (("a.npz", 1), ("b.npz", 1), ("c.npz", 2)):
        assert script.main([str(tmp_path / "h"), "--output", str(tmp_path / name),
                            "--size", "16", "--val-fraction", "0.2", "--test-fraction", "0.2",
                            "--seed", str(seed)]) == 0
        outs.append(load_npz(tmp_path / name))
    assert all(np.array_equal(outs[0][k], outs[1][k]) for k in outs[0])
    assert not all(np.array_equal(outs[0][k], outs[2][k]) for k in outs[0])
    # A split column in the CSV is kept as given.
    with labels.open(newline="") as handle:
        rows = list(csv.reader(handle))
    rows[0].append("split")
    for row in rows[1:]:
        row.append("test" if row[2] in {"person1", "P002", "CT1"} else "train")
    with labels.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    assert script.main([str(tmp_path / "h"), "--output", str(tmp_path / "given.npz"),
                        "--size", "16", "--val-fraction", "0"]) == 0
    given = load_npz(tmp_path / "given.npz")
    assert [len(given[f"{s}_labels"]) for s in ("train", "val", "test")] == [8, 0, 4]


def test_prepare_images_bad_input_is_one_line(shared_data, tmp_path, capsys):
    script = _script()
    labels = _hospital_folder(shared_data, tmp_path / "h")
    with labels.open("a") as handle:
        handle.write("cxr/lost.jpeg,normal,IM-0002\n")
    code = script.main([str(tmp_path / "h"), "--output", str(tmp_path / "x.npz")])
    err = capsys.readouterr().err
    assert code == 2 and not (tmp_path / "x.npz").exists()
    assert err.startswith("error: ") and "labels.csv:14: image cxr/lost.jpeg does not exist" in err
    assert "Traceback" not in err


def test_prepare_images_rejects_a_patient_in_two_given_splits(shared_data, tmp_path, capsys):
    script = _script()
    labels = _hospital_folder(shared_data, tmp_path / "h")
    with labels.open(newline="") as handle:
        rows = list(csv.reader(handle))
    rows[0].append("split")
    for row in rows[1:]:
        row.append("test" if row[0].endswith("mdb001.png") else "train")  # P001 split in two
    with labels.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    assert script.main([str(tmp_path / "h"), "--output", str(tmp_path / "x.npz")]) == 2
    assert "patient P001 has images in both" in capsys.readouterr().err


def test_prepare_images_bad_fractions_and_too_few_patients(shared_data, tmp_path, capsys):
    _hospital_folder(shared_data, tmp_path / "h")
    script = _script()
    code = script.main([str(tmp_path / "h"), "--output", str(tmp_path / "x.npz"),
                        "--val-fraction", "0.6", "--test-fraction", "0.6"])
    assert code == 2 and "sum to less than 1" in capsys.readouterr().err
    # 4-5 patients per label: a 5 % test share rounds to no test patient at all.
    code = script.main([str(tmp_path / "h"), "--output", str(tmp_path / "x.npz"),
                        "--val-fraction", "0.2", "--test-fraction", "0.05"])
    assert code == 2 and "the test split is empty (9 patients)" in capsys.readouterr().err
    assert not (tmp_path / "x.npz").exists()
