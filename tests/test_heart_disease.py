"""The four real hospitals: protocol counts, encoding, and clear errors for bad files."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from tasks import DataError
from tasks.base import SiteRef
from tasks.heart_disease import SITE_FILES, TASK, encode, read_site_file


def _cfg(data_dir: Path | None, protocol: str = "flamby"):
    return OmegaConf.create(
        {
            "task": {
                "data_dir": str(data_dir) if data_dir else None,
                "protocol": protocol,
                "test_fraction": 0.34,
                "split_seed": 42,
            }
        }
    )


@pytest.mark.parametrize(
    ("protocol", "counts"),
    [("flamby", [303, 261, 46, 130]), ("impute", [303, 294, 123, 200])],
)
def test_protocol_patient_counts(shared_data: Path, protocol: str, counts: list[int]) -> None:
    folder = shared_data / "heart_disease"
    got = [len(encode(read_site_file(folder / f), protocol)[1]) for f in SITE_FILES.values()]
    assert got == counts


def test_encoding_one_hot_and_binary_target(shared_data: Path) -> None:
    x, y, names = encode(
        read_site_file(shared_data / "heart_disease" / SITE_FILES["cleveland"]), "flamby"
    )
    assert names[:2] == ["age", "sex"] and "cp=4" in names and "restecg=2" in names
    assert not {"slope", "ca", "thal"} & set(names)
    cp = [names.index(f"cp={k}") for k in (1, 2, 3, 4)]
    np.testing.assert_array_equal(x[:, cp].sum(axis=1), 1.0)
    assert y.sum() == 139 and set(np.unique(y)) == {0, 1}


def test_chol_zero_is_read_as_unknown(shared_data: Path) -> None:
    x, _, names = encode(
        read_site_file(shared_data / "heart_disease" / SITE_FILES["switzerland"]), "flamby"
    )
    assert np.isnan(x[:, names.index("chol")]).all()


def test_sites_split_66_34_stratified_with_fixed_seed(shared_data: Path) -> None:
    cfg = _cfg(shared_data / "heart_disease")
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
    assert site.num_train + site.num_test == 130


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
    with pytest.raises(DataError, match=r"task\.protocol must be one of flamby, impute"):
        TASK.load_site(_cfg(shared_data / "heart_disease", "drop_all"), SiteRef("va", index=3))
