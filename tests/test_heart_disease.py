"""The four real hospitals: FLamby's exact split, protocol counts, encoding, duplicates, and
clear errors for bad files."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from sklearn.model_selection import train_test_split

from tasks import DataError
from tasks.base import SiteRef
from tasks.heart_disease import SITE_FILES, TASK, encode, read_site_file


def _cfg(data_dir: Path | None, protocol: str = "flamby", split_seed: int | None = None):
    return OmegaConf.create(
        {
            "task": {
                "data_dir": str(data_dir) if data_dir else None,
                "protocol": protocol,
                "test_fraction": 0.34,
                "split_seed": split_seed,
            }
        }
    )


def _flamby_centre(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """FLamby's HeartDiseaseRaw recipe for one centre, rebuilt here from the raw file with
    numpy and scikit-learn only (not with tasks.heart_disease): drop columns 10-12 (slope,
    ca, thal) and every row with a missing value, then ``train_test_split(np.arange(nb),
    test_size=1.0 - 0.66, train_size=0.66, random_state=43, shuffle=True, stratify=...)``
    stratified when both classes have more than 2 rows; one-hot cp (col 2) and restecg
    (col 6) with drop_first=True, dummies after the other columns as pd.get_dummies does.
    Returns (features, binary labels, train indices, test indices)."""
    raw = np.genfromtxt(path, delimiter=",", missing_values=["?", "NaN"], filling_values=np.nan)
    raw = np.delete(raw, [10, 11, 12], axis=1)
    raw = raw[~np.isnan(raw).any(axis=1)]
    labels = np.where(raw[:, -1] == 0, 0, 1)
    levels, counts = np.unique(labels, return_counts=True)
    stratify = labels if len(levels) > 1 and all(counts > 2) else None
    _, test = train_test_split(np.arange(len(raw)), test_size=1.0 - 0.66, train_size=0.66,
                               random_state=43, shuffle=True, stratify=stratify)
    train = np.array([i for i in range(len(raw)) if i not in test])
    plain = raw[:, [0, 1, 3, 4, 5, 7, 8, 9]]
    dummies = [raw[:, 2] == v for v in (2, 3, 4)] + [raw[:, 6] == v for v in (1, 2)]
    features = np.column_stack([plain, *dummies]).astype(float)
    return features, labels, train, np.sort(test)


def test_flamby_protocol_is_flambys_split_and_features(shared_data: Path) -> None:
    """Per hospital, the test set is FLamby's, row for row; training is FLamby's less the
    one VA line that repeats a test patient."""
    cfg = _cfg(shared_data / "heart_disease")
    sizes, leaked = {}, {}
    for i, (name, file) in enumerate(SITE_FILES.items()):
        x, y, train, test = _flamby_centre(shared_data / "heart_disease" / file)
        site = TASK.load_site(cfg, SiteRef(name, index=i))
        assert site.info["num_features"] == 13
        np.testing.assert_array_equal(site.raw["x_test"], x[test])
        np.testing.assert_array_equal(site.raw["y_test"], y[test])
        test_rows = {(*row, label) for row, label in zip(x[test], y[test], strict=True)}
        repeats = [j for j in train if (*x[j], y[j]) in test_rows]
        kept = np.setdiff1d(train, repeats)
        np.testing.assert_array_equal(site.raw["x_train"], x[kept])
        np.testing.assert_array_equal(site.raw["y_train"], y[kept])
        sizes[name] = (len(train), len(test))
        leaked[name] = len(repeats)
    # FLamby's published per-centre sizes (Fed-Heart-Disease README)
    assert sizes == {"cleveland": (199, 104), "hungary": (172, 89), "switzerland": (30, 16),
                     "va": (85, 45)}
    assert leaked == {"cleveland": 0, "hungary": 0, "switzerland": 0, "va": 1}


def test_flamby_keeps_chol_zero_and_drops_the_first_level(shared_data: Path) -> None:
    x, _, names = encode(
        read_site_file(shared_data / "heart_disease" / SITE_FILES["switzerland"]), "flamby"
    )
    assert names == ["age", "sex", "trestbps", "chol", "fbs", "thalach", "exang", "oldpeak",
                     "cp=2", "cp=3", "cp=4", "restecg=1", "restecg=2"]
    assert (x[:, names.index("chol")] == 0).all() and not np.isnan(x).any()


def test_flamby_split_is_fixed(shared_data: Path) -> None:
    with pytest.raises(DataError, match=r"protocol=flamby is FLamby's fixed split"):
        TASK.load_site(_cfg(shared_data / "heart_disease", split_seed=42),
                       SiteRef("va", index=3))


@pytest.mark.parametrize(("protocol", "sizes"), [
    ("flamby_sizes", {"cleveland": 303, "hungary": 261, "switzerland": 46, "va": 129}),
    ("impute", {"cleveland": 303, "hungary": 293, "switzerland": 123, "va": 199}),
])
def test_duplicated_patient_lines_are_dropped_before_splitting(
    shared_data: Path, protocol: str, sizes: dict[str, int]
) -> None:
    """The Hungarian and VA files each repeat one patient line: one copy is kept."""
    got = {}
    for i, name in enumerate(SITE_FILES):
        site = TASK.load_site(_cfg(shared_data / "heart_disease", protocol, 42),
                              SiteRef(name, index=i))
        rows = np.column_stack([np.concatenate([site.raw["x_train"], site.raw["x_test"]]),
                                np.concatenate([site.raw["y_train"], site.raw["y_test"]])])
        keys = {tuple(np.nan_to_num(row, nan=-1.0)) for row in rows}
        assert len(keys) == len(rows), name  # no patient twice, so none on both sides
        got[name] = len(rows)
    assert got == sizes


@pytest.mark.parametrize(
    ("protocol", "counts"),
    [("flamby", [303, 261, 46, 130]), ("flamby_sizes", [303, 261, 46, 130]),
     ("impute", [303, 294, 123, 200])],
)
def test_protocol_patient_counts(shared_data: Path, protocol: str, counts: list[int]) -> None:
    folder = shared_data / "heart_disease"
    got = [len(encode(read_site_file(folder / f), protocol)[1]) for f in SITE_FILES.values()]
    assert got == counts


def test_encoding_one_hot_and_binary_target(shared_data: Path) -> None:
    x, y, names = encode(
        read_site_file(shared_data / "heart_disease" / SITE_FILES["cleveland"]), "flamby_sizes"
    )
    assert names[:2] == ["age", "sex"] and "cp=4" in names and "restecg=2" in names
    assert not {"slope", "ca", "thal"} & set(names)
    cp = [names.index(f"cp={k}") for k in (1, 2, 3, 4)]
    np.testing.assert_array_equal(x[:, cp].sum(axis=1), 1.0)
    assert y.sum() == 139 and set(np.unique(y)) == {0, 1}


def test_chol_zero_is_read_as_unknown_outside_flamby(shared_data: Path) -> None:
    x, _, names = encode(
        read_site_file(shared_data / "heart_disease" / SITE_FILES["switzerland"]), "flamby_sizes"
    )
    assert np.isnan(x[:, names.index("chol")]).all()


def test_sites_split_66_34_stratified_with_fixed_seed(shared_data: Path) -> None:
    cfg = _cfg(shared_data / "heart_disease", "flamby_sizes", 42)
    a = TASK.load_site(cfg, SiteRef("cleveland", index=0))
    b = TASK.load_site(cfg, SiteRef("cleveland", index=0))
    assert a.num_train + a.num_test == 303 and a.num_test == 104
    np.testing.assert_array_equal(a.raw["x_test"], b.raw["x_test"])
    assert abs(a.raw["y_train"].mean() - a.raw["y_test"].mean()) < 0.02
    swiss = TASK.load_site(cfg, SiteRef("switzerland", index=2))  # one negative: unstratified
    assert swiss.num_train + swiss.num_test == 46


def test_deployment_data_path_may_be_the_hospital_file(shared_data: Path) -> None:
    path = shared_data / "heart_disease" / SITE_FILES["va"]
    site = TASK.load_site(_cfg(None), SiteRef("va", data_path=path))
    assert site.num_train + site.num_test == 129  # 130 less the training copy of a test patient


@pytest.fixture
def broken_copy(tmp_path: Path, shared_data: Path) -> Path:
    target = tmp_path / "heart_disease"
    shutil.copytree(shared_data / "heart_disease", target)
    return target


def test_truncated_row_names_file_and_line(broken_copy: Path) -> None:
    path = broken_copy / SITE_FILES["hungary"]
    lines = path.read_text().splitlines()
    lines[6] = ",".join(lines[6].split(",")[:9])
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(
        DataError, match=r"processed\.hungarian\.data, line 7: expected 14 .*found 9"
    ):
        TASK.load_site(_cfg(broken_copy), SiteRef("hungary", index=1))


def test_non_numeric_cell_names_file_line_and_column(broken_copy: Path) -> None:
    path = broken_copy / SITE_FILES["va"]
    lines = path.read_text().splitlines()
    cells = lines[41].split(",")
    cells[4] = "high"
    lines[41] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(
        DataError, match=r"processed\.va\.data, line 42: column 'chol' holds 'high'"
    ):
        TASK.load_site(_cfg(broken_copy), SiteRef("va", index=3))


def test_missing_data_directory_and_missing_file_are_explained(
    tmp_path: Path, broken_copy: Path
) -> None:
    with pytest.raises(DataError, match=r"task.data_dir '.*nowhere' is not a folder"):
        TASK.load_site(_cfg(tmp_path / "nowhere"), SiteRef("cleveland", index=0))
    with pytest.raises(DataError, match=r"task\.data_dir is not set"):
        TASK.load_site(_cfg(None), SiteRef("cleveland", index=0))
    (broken_copy / SITE_FILES["cleveland"]).unlink()
    with pytest.raises(DataError, match=r"data file not found: .*processed\.cleveland\.data"):
        TASK.load_site(_cfg(broken_copy), SiteRef("cleveland", index=0))


def test_unknown_protocol_is_rejected(shared_data: Path) -> None:
    with pytest.raises(DataError,
                       match=r"task\.protocol must be one of flamby, flamby_sizes, impute"):
        TASK.load_site(_cfg(shared_data / "heart_disease", "drop_all"), SiteRef("va", index=3))
