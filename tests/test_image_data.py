"""Image loaders on the real files in ../shared/data: npz, JPEG, PGM/PNG films, DICOM, folders."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from tasks import DataError
from tasks.image_data import ImageSet, load_folder, load_image, load_npz, resize

CXR_SAMPLES = [
    "kermany_test_NORMAL_IM-0001-0001.jpeg",
    "kermany_test_PNEUMONIA_person1_virus_6.jpeg",
    "kermany_test_PNEUMONIA_person100_bacteria_477.jpeg",
]
FILMS = ["mdb001", "mdb003", "mdb023"]


def _rows(csv_path: Path) -> list[dict[str, str]]:
    with csv_path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _mias_row(shared_data: Path, image_id: str) -> tuple[str, int, int]:
    """(split, index_in_split, label) of one mini-MIAS film in the npz files."""
    row = next(r for r in _rows(shared_data / "mammography" / "mias_metadata.csv")
               if r["image_id"] == image_id)
    return row["split"], int(row["index_in_split"]), int(row["label"])


# --------------------------------------------------------------------------- npz


@pytest.mark.parametrize(
    ("relpath", "side", "sizes", "train_counts"),
    [
        ("chest_xray/pneumoniamnist_full_reconstructed.npz", 28, (4708, 524, 624), [1214, 3494]),
        ("chest_xray/kermany_cxr_64.npz", 64, (4719, 497, 624), [1209, 3510]),
        ("chest_xray/kermany_cxr_128_subset.npz", 128, (952, 243, 624), [241, 711]),
        ("mammography/mias_128.npz", 128, (226, 32, 64), [146, 43, 37]),
        ("mammography/mias_256.npz", 256, (226, 32, 64), [146, 43, 37]),
    ],
)
def test_load_npz_real_files(shared_data, relpath, side, sizes, train_counts):
    data = load_npz(shared_data / relpath)
    for split, n in zip(("train", "val", "test"), sizes, strict=True):
        images, labels = data[f"{split}_images"], data[f"{split}_labels"]
        assert images.shape == (n, side, side) and images.dtype == np.uint8
        assert labels.shape == (n,) and labels.dtype == np.int64
        # Real radiographs use (nearly) the whole 8-bit range, not a constant or 0/1 mask.
        assert images.min() <= 10 and images.max() >= 220
        assert 40 < images.mean() < 200
    assert np.bincount(data["train_labels"]).tolist() == train_counts


def test_load_npz_accepts_channel_last_and_rgb(shared_data, tmp_path):
    real = load_npz(shared_data / "chest_xray/pneumoniamnist_full_reconstructed.npz")
    small = {key: value[:50] for key, value in real.items()}
    as_channel = {k: (v[..., None] if k.endswith("images") else v[:, None].astype(np.uint8))
                  for k, v in small.items()}
    as_rgb = {k: (np.repeat(v[..., None], 3, axis=-1) if k.endswith("images") else v)
              for k, v in small.items()}
    for name, arrays in (("channel.npz", as_channel), ("rgb.npz", as_rgb)):
        np.savez(tmp_path / name, **arrays)
        loaded = load_npz(tmp_path / name)
        for key, value in small.items():
            assert loaded[key].dtype == value.dtype
            # R = G = B, so the luma is the original gray value (within rounding).
            assert np.abs(loaded[key].astype(int) - value.astype(int)).max() <= 1, (name, key)


def test_truncated_npz_names_the_file(shared_data, tmp_path):
    source = (shared_data / "mammography/mias_128.npz").read_bytes()
    broken = tmp_path / "mias_128_truncated.npz"
    broken.write_bytes(source[: len(source) // 2])
    with pytest.raises(DataError, match=r"mias_128_truncated\.npz: truncated or corrupt"):
        load_npz(broken)


def test_corrupt_npz_member_names_the_file(shared_data, tmp_path):
    source = bytearray((shared_data / "mammography/mias_128.npz").read_bytes())
    # Flip bytes in the middle of the first (compressed) member; the zip directory stays intact,
    # so the damage only shows when the array is decompressed.
    for i in range(2000, 2400):
        source[i] ^= 0xFF
    broken = tmp_path / "mias_128_corrupt.npz"
    broken.write_bytes(bytes(source))
    with pytest.raises(DataError, match=r"mias_128_corrupt\.npz: truncated or corrupt"):
        load_npz(broken)


def test_npz_missing_keys_are_listed(shared_data, tmp_path):
    real = load_npz(shared_data / "mammography/mias_128.npz")
    np.savez(tmp_path / "noval.npz", **{k: v for k, v in real.items() if not k.startswith("val")})
    with pytest.raises(DataError, match=r"noval\.npz: missing key\(s\) val_images, val_labels"):
        load_npz(tmp_path / "noval.npz")


def test_npz_count_mismatch(shared_data, tmp_path):
    real = load_npz(shared_data / "mammography/mias_128.npz")
    real["test_labels"] = real["test_labels"][:-1]
    np.savez(tmp_path / "short.npz", **real)
    with pytest.raises(DataError, match=r"short\.npz: test_images has 64 images but test_labels "
                                        r"has 63"):
        load_npz(tmp_path / "short.npz")


def test_npz_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nothere\.npz: npz file does not exist"):
        load_npz(tmp_path / "nothere.npz")


# --------------------------------------------------------------------------- PNG / PGM / JPEG


@pytest.mark.parametrize("image_id", FILMS)
def test_film_png_and_pgm_match_npz_orientation(shared_data, image_id):
    samples = shared_data / "mammography" / "samples"
    png = load_image(samples / f"{image_id}.png")
    pgm = load_image(samples / f"{image_id}.pgm")
    assert png.shape == (1024, 1024) and png.dtype == np.float32
    assert png.min() >= 0.0 and png.max() <= 1.0 and png.max() > 0.5
    np.testing.assert_array_equal(png, pgm)  # lossless PNG of the same film
    split, index, _ = _mias_row(shared_data, image_id)
    for side in (128, 256):
        stored = load_npz(shared_data / f"mammography/mias_{side}.npz")[f"{split}_images"][index]
        ours = resize(png, side) * 255.0  # area resize = the block mean used for the npz
        # Only the npz's uint8 rounding (PIL's fixed-point BOX filter) differs.
        assert np.abs(ours - stored).max() <= 1.0 + 1e-3
        assert np.abs(ours - stored).mean() < 0.5
        # The transpose (MONAI's default (W, H) order) would be far off: films are asymmetric.
        assert np.abs(ours.T - stored).mean() > 10.0


def test_jpeg_samples_are_gray_and_match_kermany_npz(shared_data):
    meta = _rows(shared_data / "chest_xray" / "kermany_cxr_metadata.csv")
    kermany = load_npz(shared_data / "chest_xray" / "kermany_cxr_64.npz")
    for name in CXR_SAMPLES:
        path = shared_data / "chest_xray" / "samples" / name
        image = load_image(path)
        assert image.shape == (224, 224) and image.dtype == np.float32
        assert 0.0 <= image.min() < 0.1 and 0.8 < image.max() <= 1.0
        # The luma PIL computes ('L'), as used to build the npz files.
        expected = np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255.0
        np.testing.assert_allclose(image, expected, atol=1e-6)
        cls = "NORMAL" if "NORMAL" in name else "PNEUMONIA"
        source = f"dataset/test/{cls}/{name.removeprefix(f'kermany_test_{cls}_')}"
        row = next(r for r in meta if r["source_path"] == source)
        stored = kermany[f"{row['split']}_images"][int(row["index_64"])].astype(np.float32)
        ours = resize(image, 64) * 255.0  # area vs the npz's LANCZOS: close, not equal
        assert np.corrcoef(ours.ravel(), stored.ravel())[0, 1] > 0.98
        assert np.abs(ours - stored).mean() < 4.0
        assert np.abs(ours.T - stored).mean() > 3 * np.abs(ours - stored).mean()


def test_16bit_png_is_scaled_by_its_range(shared_data, tmp_path):
    film = np.asarray(Image.open(shared_data / "mammography/samples/mdb003.png"))
    # A 12-bit detector image in a 16-bit PNG container, as DICOM exports often are.
    wide = (film.astype(np.uint16) * 16 + 7).astype(np.uint16)
    Image.fromarray(wide).save(tmp_path / "mdb003_16bit.png")
    assert Image.open(tmp_path / "mdb003_16bit.png").mode.startswith("I")
    image = load_image(tmp_path / "mdb003_16bit.png")
    expected = (film - film.min()) / float(film.max() - film.min())
    assert image.shape == (1024, 1024)
    np.testing.assert_allclose(image, expected, atol=1e-5)


def test_missing_and_unreadable_image(tmp_path):
    with pytest.raises(DataError, match=r"gone\.png: image file does not exist"):
        load_image(tmp_path / "gone.png")
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(DataError, match=r"notes\.png: unreadable image"):
        load_image(tmp_path / "notes.png")


# --------------------------------------------------------------------------- DICOM


def test_dicom_dx_monochrome2_minmax(shared_data):
    path = shared_data / "dicom" / "nih_cxr14_DX_no_finding.dcm"
    image = load_image(path)
    stored = pydicom.dcmread(path).pixel_array.astype(np.float32)
    assert image.shape == (1024, 1024) and image.dtype == np.float32
    # No window in the file: min-max of the stored values, same orientation as pydicom.
    expected = (stored - stored.min()) / (stored.max() - stored.min())
    np.testing.assert_allclose(image, expected, atol=1e-6)


def test_dicom_cr_monochrome1_is_inverted_and_windowed(shared_data):
    path = shared_data / "dicom" / "nema_wg04_RG1_chest_CR_4x_uncompressed.dcm"
    ds = pydicom.dcmread(path)
    stored = ds.pixel_array.astype(np.float32)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    assert (stored.min(), stored.max()) == (1052, 26335)  # as the data README documents
    image = load_image(path)
    assert image.shape == (488, 460) == (ds.Rows, ds.Columns)  # (H, W), not transposed
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)  # 15000, 30000
    expected = 1.0 - np.clip((stored - (center - width / 2)) / width, 0.0, 1.0)
    np.testing.assert_allclose(image, expected, atol=1e-5)
    assert np.corrcoef(image.ravel(), stored.ravel())[0, 1] < -0.999  # the inverted relation
    # As displayed: aerated lungs dark, mediastinum / spine bright.
    right_lung, left_lung = image[100:200, 90:160].mean(), image[100:200, 300:370].mean()
    mediastinum = image[100:250, 215:245].mean()
    assert max(right_lung, left_lung) + 0.15 < mediastinum


def test_dicom_ct_rescale_then_window(shared_data, tmp_path):
    path = shared_data / "dicom" / "pydicom_CT_small.dcm"
    ds = pydicom.dcmread(path)
    hounsfield = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(
        ds.RescaleIntercept)
    assert (hounsfield.min(), hounsfield.max()) == (-896.0, 1167.0)  # stored 128..2191, -1024
    image = load_image(path)
    assert image.shape == (128, 128)
    np.testing.assert_allclose(image, (hounsfield + 896.0) / (1167.0 + 896.0), atol=1e-6)
    # A soft-tissue window is in Hounsfield units: only right if the rescale came first.
    ds.WindowCenter, ds.WindowWidth = 40, 400
    ds.save_as(tmp_path / "ct_window.dcm")
    windowed = load_image(tmp_path / "ct_window.dcm")
    np.testing.assert_allclose(windowed, np.clip((hounsfield + 160.0) / 400.0, 0, 1), atol=1e-6)
    assert 0.05 < (windowed == 0).mean() < 0.95 and (windowed == 1).mean() > 0.001


def _j2k_decoder():
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEG2000

    return get_decoder(JPEG2000)


def test_dicom_jpeg2000_decodes_like_derived_copy(shared_data):
    if not _j2k_decoder().is_available:
        pytest.skip("no JPEG 2000 decoder installed (Pillow with openjpeg, pylibjpeg or gdcm)")
    image = load_image(shared_data / "dicom" / "nema_wg04_RG1_J2KI_chest_CR.dcm")
    assert image.shape == (1955, 1841)
    derived = load_image(shared_data / "dicom" / "nema_wg04_RG1_chest_CR_4x_uncompressed.dcm")
    # The derived file is the 4x4 block mean of the decoded film cropped to 1952 x 1840.
    blocks = image[:1952, :1840].reshape(488, 4, 460, 4).mean(axis=(1, 3))
    assert np.abs(blocks - derived).max() < 2e-3


@pytest.fixture
def without_pillow_j2k():
    """Unregister pydicom's Pillow JPEG 2000 plugin (pydicom's own API), then restore it."""
    from pydicom.pixels.decoders.base import JPEG2000Decoder, JPEG2000LosslessDecoder

    removed = []
    for decoder in (JPEG2000Decoder, JPEG2000LosslessDecoder):
        if "pillow" in decoder.available_plugins:
            decoder.remove_plugin("pillow")
            removed.append(decoder)
    try:
        yield
    finally:
        for decoder in removed:
            decoder.add_plugin("pillow", ("pydicom.pixels.decoders.pillow", "_decode_frame"))


def test_undecodable_jpeg2000_names_file_syntax_and_packages(shared_data, without_pillow_j2k):
    if _j2k_decoder().is_available:
        pytest.skip("a JPEG 2000 decoder other than Pillow (pylibjpeg or gdcm) is installed")
    path = shared_data / "dicom" / "nema_wg04_RG1_J2KI_chest_CR.dcm"
    with pytest.raises(DataError) as info:
        load_image(path)
    message = str(info.value)
    assert message.startswith(f"{path}: cannot decode pixel data")
    assert "JPEG 2000 Image Compression (1.2.840.10008.1.2.4.91)" in message
    assert "pylibjpeg" in message and "pylibjpeg-openjpeg" in message and "gdcm" in message


def test_not_a_dicom(shared_data, tmp_path):
    shutil.copy(shared_data / "chest_xray/samples" / CXR_SAMPLES[0], tmp_path / "fake.dcm")
    with pytest.raises(DataError, match=r"fake\.dcm: not a readable DICOM file"):
        load_image(tmp_path / "fake.dcm")


# --------------------------------------------------------------------------- folders


def _copy_samples(shared_data: Path, folder: Path) -> list[tuple[str, str, str]]:
    """Real images of mixed formats in ``folder``: (relative path, label, patient id)."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for name in CXR_SAMPLES:
        shutil.copy(shared_data / "chest_xray/samples" / name, folder / name)
        label = "normal" if "NORMAL" in name else "pneumonia"
        entries.append((name, label, name.split("_")[3].split("-")[0]))
    (folder / "films").mkdir(exist_ok=True)
    for image_id in FILMS:
        shutil.copy(shared_data / "mammography/samples" / f"{image_id}.png",
                    folder / "films" / f"{image_id}.png")
        entries.append((f"films/{image_id}.png", "normal", image_id))
    for name in ("nih_cxr14_DX_no_finding.dcm", "nema_wg04_RG1_chest_CR_4x_uncompressed.dcm"):
        shutil.copy(shared_data / "dicom" / name, folder / name)
        entries.append((name, "normal", name.split("_")[0]))
    return entries


def _write_manifest(path: Path, entries, header=("path", "label", "patient_id")) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(entries)
    return path


def test_load_folder_manifest_mixed_formats(shared_data, tmp_path):
    entries = _copy_samples(shared_data, tmp_path / "site")
    manifest = _write_manifest(tmp_path / "site" / "manifest.csv", entries)
    data = load_folder(tmp_path / "site", manifest, classes=["normal", "pneumonia"], size=64)
    assert isinstance(data, ImageSet) and len(data) == 8
    assert data.images.shape == (8, 1, 64, 64) and data.images.dtype == np.float32
    assert data.images.min() >= 0.0 and data.images.max() <= 1.0
    assert data.labels.tolist() == [0, 1, 1, 0, 0, 0, 0, 0] and data.labels.dtype == np.int64
    assert data.patient_ids[:3] == ["IM", "person1", "person100"]
    assert data.classes == ["normal", "pneumonia"] and data.splits is None
    # The film row equals the film loaded on its own and resized (same orientation).
    np.testing.assert_allclose(
        data.images[3, 0], resize(load_image(shared_data / "mammography/samples/mdb001.png"), 64),
        atol=1e-6)
    # Found without naming it: manifest.csv in the folder; labels as class indices.
    _write_manifest(manifest, [(p, "1" if lab == "pneumonia" else "0", pid)
                               for p, lab, pid in entries])
    again = load_folder(tmp_path / "site", size=64)
    assert again.labels.tolist() == data.labels.tolist() and again.classes == ["0", "1"]


def test_load_folder_class_subfolders(shared_data, tmp_path):
    for name in CXR_SAMPLES:
        cls = "NORMAL" if "NORMAL" in name else "PNEUMONIA"
        (tmp_path / cls).mkdir(exist_ok=True)
        shutil.copy(shared_data / "chest_xray/samples" / name, tmp_path / cls / name)
    data = load_folder(tmp_path)  # all 224 x 224: no resize needed
    assert data.images.shape == (3, 1, 224, 224)
    assert data.classes == ["NORMAL", "PNEUMONIA"] and data.labels.tolist() == [0, 1, 1]
    assert data.patient_ids is None
    with pytest.raises(DataError, match=r"sub-folder\(s\) \['PNEUMONIA'\] are not among"):
        load_folder(tmp_path, classes=["NORMAL"])


def test_manifest_missing_image_names_the_line(shared_data, tmp_path):
    entries = _copy_samples(shared_data, tmp_path)
    entries.insert(1, ("missing/IM-9999.jpeg", "normal", "IM"))
    manifest = _write_manifest(tmp_path / "labels.csv", entries)
    with pytest.raises(DataError, match=r"labels\.csv:3: image missing/IM-9999\.jpeg does not "
                                        r"exist"):
        load_folder(tmp_path, manifest, classes=["normal", "pneumonia"], size=32)


def test_manifest_label_outside_class_set_names_the_line(shared_data, tmp_path):
    entries = _copy_samples(shared_data, tmp_path)
    entries[4] = (entries[4][0], "covid", entries[4][2])
    manifest = _write_manifest(tmp_path / "labels.csv", entries)
    with pytest.raises(DataError, match=r"labels\.csv:6: label 'covid' is not one of the classes "
                                        r"\['normal', 'pneumonia'\]"):
        load_folder(tmp_path, manifest, classes=["normal", "pneumonia"], size=32)
    entries[4] = (entries[4][0], "2", entries[4][2])  # index out of range
    _write_manifest(manifest, entries)
    with pytest.raises(DataError, match=r"labels\.csv:6: label '2' is not one of the classes"):
        load_folder(tmp_path, manifest, classes=["normal", "pneumonia"], size=32)


def test_manifest_unreadable_image_names_the_line(shared_data, tmp_path):
    entries = _copy_samples(shared_data, tmp_path)
    source = (tmp_path / CXR_SAMPLES[1]).read_bytes()
    (tmp_path / "cut.jpeg").write_bytes(source[:200])  # a JPEG cut inside its header
    entries.append(("cut.jpeg", "pneumonia", "person7"))
    manifest = _write_manifest(tmp_path / "labels.csv", entries)
    with pytest.raises(DataError, match=r"labels\.csv:10: .*cut\.jpeg: unreadable image"):
        load_folder(tmp_path, manifest, classes=["normal", "pneumonia"], size=32)


def test_manifest_problems_in_header_and_sizes(shared_data, tmp_path):
    entries = _copy_samples(shared_data, tmp_path)
    bad = _write_manifest(tmp_path / "bad.csv", [(p, lab) for p, lab, _ in entries],
                          header=("file", "label"))
    with pytest.raises(DataError, match=r"bad\.csv: header .* missing column\(s\) path"):
        load_folder(tmp_path, bad)
    manifest = _write_manifest(tmp_path / "labels.csv", entries)
    with pytest.raises(DataError, match=r"images differ in size .* pass size="):
        load_folder(tmp_path, manifest)


def test_load_folder_finds_dicom_without_extension(shared_data, tmp_path):
    (tmp_path / "normal").mkdir()
    (tmp_path / "abnormal").mkdir()
    shutil.copy(shared_data / "dicom/nih_cxr14_DX_no_finding.dcm", tmp_path / "normal" / "IM0001")
    shutil.copy(shared_data / "dicom/nema_wg04_RG1_chest_CR_4x_uncompressed.dcm",
                tmp_path / "abnormal" / "IM0002")
    (tmp_path / "normal" / "README").write_text("export notes, not an image")
    data = load_folder(tmp_path, classes=["normal", "abnormal"], size=(64, 60))
    assert data.images.shape == (2, 1, 64, 60) and data.labels.tolist() == [0, 1]
    direct = load_image(shared_data / "dicom/nema_wg04_RG1_chest_CR_4x_uncompressed.dcm")
    np.testing.assert_allclose(data.images[1, 0], resize(direct, (64, 60)), atol=1e-6)
