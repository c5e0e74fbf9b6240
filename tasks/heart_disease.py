"""UCI Heart Disease, four real hospitals: Cleveland, Hungary, Switzerland, VA Long Beach.

One hospital = one site. Protocols (``task.protocol``):
- ``flamby`` (default), as the FLamby Fed-Heart-Disease benchmark: drop ``slope``, ``ca``,
  ``thal``; drop rows with a missing value (740 patients: 303/261/46/130); ``chol`` = 0 means
  "unknown" in the UCI files, so it is treated as missing and imputed with the federated mean
  instead of being read as a cholesterol of 0.
- ``impute``: keep all 920 patients; every missing value is imputed with the federated mean.
Chest-pain type and resting ECG are one-hot encoded; target: ``num > 0``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from tasks import tabular
from tasks.base import DataError, SiteData, SiteRef, Task
from tasks.data_checks import describe_folder, first_data_line, kind_of_file

# site name -> file name in the data folder
SITE_FILES = {
    "cleveland": "processed.cleveland.data",
    "hungary": "processed.hungarian.data",
    "switzerland": "processed.switzerland.data",
    "va": "processed.va.data",
}
COLUMNS = [
    "age", "sex", "cp", "trestbps", "chol", "fbs", "restecg",
    "thalach", "exang", "oldpeak", "slope", "ca", "thal", "num",
]
DROPPED = ("slope", "ca", "thal")
CATEGORICAL = {"cp": (1, 2, 3, 4), "restecg": (0, 1, 2)}
MISSING = {"nan", "?", ""}
PROTOCOLS = ("flamby", "impute")


def read_site_file(path: Path) -> np.ndarray:
    """Read one headerless 14-column UCI file into a float array (NaN = missing).

    Raises DataError naming the file and line of a short row or a non-numeric cell.
    """
    if not path.is_file():
        raise DataError(f"heart-disease data file not found: {path}")
    rows: list[list[float]] = []
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            cells = [c.strip() for c in line.strip().split(",")]
            if len(cells) != len(COLUMNS):
                raise DataError(
                    f"{path}, line {line_no}: expected {len(COLUMNS)} comma-separated values "
                    f"({', '.join(COLUMNS)}), found {len(cells)}"
                )
            row = []
            for column, cell in zip(COLUMNS, cells, strict=True):
                if cell.lower() in MISSING:
                    row.append(math.nan)
                    continue
                try:
                    row.append(float(cell))
                except ValueError:
                    raise DataError(
                        f"{path}, line {line_no}: column '{column}' holds '{cell}', "
                        "which is not a number (missing values are written NaN or ?)"
                    ) from None
            rows.append(row)
    if not rows:
        raise DataError(f"{path}: the file holds no rows")
    table = np.asarray(rows, dtype=np.float64)
    if np.isnan(table[:, COLUMNS.index("num")]).any():
        line = int(np.flatnonzero(np.isnan(table[:, -1]))[0]) + 1
        raise DataError(f"{path}, row {line}: the target 'num' is missing")
    return table


def encode(table: np.ndarray, protocol: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Apply the protocol: select rows and columns, one-hot categoricals, binary target."""
    if protocol not in PROTOCOLS:
        raise DataError(f"task.protocol must be one of {', '.join(PROTOCOLS)}, got '{protocol}'")
    keep = [c for c in COLUMNS[:-1] if c not in DROPPED]
    x = table[:, [COLUMNS.index(c) for c in keep]]
    y = (table[:, COLUMNS.index("num")] > 0).astype(np.int64)
    if protocol == "flamby":
        complete = ~np.isnan(x).any(axis=1)
        x, y = x[complete], y[complete]
    chol = keep.index("chol")
    x[x[:, chol] == 0, chol] = np.nan  # 0 = unknown in the UCI files
    columns, names = [], []
    for i, col in enumerate(keep):
        if col in CATEGORICAL:
            for level in CATEGORICAL[col]:
                onehot = np.where(np.isnan(x[:, i]), np.nan, (x[:, i] == level).astype(float))
                columns.append(onehot)
                names.append(f"{col}={level}")
        else:
            columns.append(x[:, i])
            names.append(col)
    return np.stack(columns, axis=1), y, names


def site_names(cfg: DictConfig) -> list[str]:
    """The four hospitals, in a fixed order (partition-id i serves site i)."""
    return list(SITE_FILES)


def _site_path(cfg: DictConfig, site: SiteRef) -> Path:
    if site.data_path is not None:  # deployment: the SuperNode says where its file is
        path = Path(site.data_path)
        return path / SITE_FILES[site.name] if path.is_dir() and site.name in SITE_FILES else path
    if not cfg.task.data_dir:
        raise DataError(
            "task.data_dir is not set: give the folder holding processed.*.data, e.g. "
            "task.data_dir=/abs/path/to/shared/data/heart_disease"
        )
    folder = Path(cfg.task.data_dir).expanduser()
    if not folder.is_dir():
        raise DataError(
            f"task.data_dir '{cfg.task.data_dir}' is not a folder (resolved to "
            f"{folder.resolve()}); give an absolute path to the heart-disease data"
        )
    return folder / SITE_FILES[site.name]


def check_data_path(path: Path, site_name: str) -> None:
    """Cheap check that a SuperNode's data-path is a UCI heart-disease file (or a folder
    holding this site's file); DataError saying what it holds instead."""
    file = path
    if path.is_dir():
        expected = SITE_FILES.get(site_name)
        if expected is None or not (path / expected).is_file():
            raise DataError(
                f"{path} is a folder holding {describe_folder(path)}; heart_disease needs the "
                f"hospital's UCI file ({expected or 'processed.<site>.data'}, "
                f"{len(COLUMNS)} comma-separated values per line) or a folder holding it"
            )
        file = path / expected
    kind = kind_of_file(file)
    if kind != "text":
        raise DataError(f"{file} is {'an' if kind[0] in 'aei' else 'a'} {kind} file; "
                        "heart_disease needs the UCI processed.*.data text file")
    cells = first_data_line(file).split(",")
    if len(cells) != len(COLUMNS):
        raise DataError(f"{file}: the first line has {len(cells)} comma-separated values; "
                        f"heart_disease expects {len(COLUMNS)} ({', '.join(COLUMNS)})")


def load_site(cfg: DictConfig, site: SiteRef) -> SiteData:
    """Read, encode and split one hospital's patients (before federated standardisation)."""
    table = read_site_file(_site_path(cfg, site))
    x, y, names = encode(table, cfg.task.protocol)
    return tabular.make_site(
        site.name, x, y, cfg.task.test_fraction, cfg.task.split_seed, names
    )


TASK = Task(
    name="heart_disease",
    site_names=site_names,
    load_site=load_site,
    build_model=tabular.build_model,
    local_statistics=tabular.local_statistics,
    apply_statistics=tabular.apply_statistics,
    natural_sites=True,
    check_data_path=check_data_path,
)
