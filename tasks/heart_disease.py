"""UCI Heart Disease, four real hospitals: Cleveland, Hungary, Switzerland, VA Long Beach.

One hospital = one site. Protocols (``task.protocol``):
- ``flamby`` (default): exactly FLamby's Fed-Heart-Disease (owkin/FLamby,
  ``flamby/datasets/fed_heart_disease/dataset.py``): drop ``slope``, ``ca``, ``thal``; drop
  rows with a missing value (740 patients: 303/261/46/130); ``chol`` = 0 kept as a value;
  chest-pain type and resting ECG one-hot with the first level dropped (13 features); per
  hospital FLamby's split: ``train_test_split(range(n), test_size=1 - 0.66, train_size=0.66,
  random_state=43, shuffle=True)``, stratified on the binary target when both classes have
  more than 2 patients (train/test 199/104, 172/89, 30/16, 85/45). One change, for trust: a
  training row that duplicates a test row is dropped (VA: one patient is in the file twice
  and FLamby's split puts one copy on each side, so VA trains on 84), so the test sets are
  exactly FLamby's and no test patient is trained on.
- ``flamby_sizes``: the protocol before FLamby's split was matched: FLamby's rows
  (duplicates dropped first), ``chol`` = 0 read as unknown and imputed with the federated
  mean, every level one-hot (15 features), split with ``task.split_seed`` (default 42) and
  ``task.test_fraction``.
- ``impute``: keep all 920 patients (less the duplicated lines); every missing value is
  imputed with the federated mean; features and split as ``flamby_sizes``.
Target: ``num > 0``. Under ``flamby_sizes`` and ``impute`` duplicated patient lines (one each
in the Hungarian and VA files) are dropped before splitting; the log says how many.
"""

from __future__ import annotations

import math
from logging import INFO
from pathlib import Path

import numpy as np
from flwr.common.logger import log
from omegaconf import DictConfig
from sklearn.model_selection import train_test_split

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
PROTOCOLS = ("flamby", "flamby_sizes", "impute")
# FLamby's split (HeartDiseaseRaw): train_fraction 0.66, random_state 43, stratified when
# both classes have more than FLAMBY_MIN_CLASS patients
FLAMBY_TRAIN_FRACTION = 0.66
FLAMBY_SEED = 43
FLAMBY_MIN_CLASS = 2
DEFAULT_SPLIT_SEED = 42  # flamby_sizes and impute when task.split_seed is null


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


def _line_keys(table: np.ndarray) -> list[bytes]:
    """One hashable key per patient line (NaN compares equal to NaN)."""
    return [row.tobytes() for row in np.where(np.isnan(table), np.inf, table)]


def drop_duplicate_lines(table: np.ndarray) -> tuple[np.ndarray, int]:
    """The table without repeated patient lines (first copy kept, order kept); how many went.

    A repeated line is one patient counted twice: split naively, the copies can land on both
    sides of the train/test split.
    """
    seen: set[bytes] = set()
    keep = np.ones(len(table), dtype=bool)
    for i, key in enumerate(_line_keys(table)):
        keep[i] = key not in seen
        seen.add(key)
    return table[keep], int((~keep).sum())


def kept_rows(table: np.ndarray, protocol: str) -> np.ndarray:
    """Mask of the lines the protocol keeps (``flamby``/``flamby_sizes``: complete ones)."""
    if protocol not in PROTOCOLS:
        raise DataError(f"task.protocol must be one of {', '.join(PROTOCOLS)}, got '{protocol}'")
    used = [COLUMNS.index(c) for c in COLUMNS if c not in DROPPED]
    if protocol == "impute":
        return np.ones(len(table), dtype=bool)
    return ~np.isnan(table[:, used]).any(axis=1)


def encode(table: np.ndarray, protocol: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Apply the protocol: select rows and columns, one-hot categoricals, binary target.

    ``flamby``: complete rows, ``chol`` kept as read, one-hot without the first level, the
    categorical columns last (FLamby's ``pd.get_dummies(..., drop_first=True)`` order).
    """
    table = table[kept_rows(table, protocol)]
    keep = [c for c in COLUMNS[:-1] if c not in DROPPED]
    x = table[:, [COLUMNS.index(c) for c in keep]]
    y = (table[:, COLUMNS.index("num")] > 0).astype(np.int64)
    if protocol == "flamby":
        plain = [i for i, col in enumerate(keep) if col not in CATEGORICAL]
        columns = [x[:, i] for i in plain]
        names = [keep[i] for i in plain]
        for col, levels in CATEGORICAL.items():
            for level in levels[1:]:
                columns.append((x[:, keep.index(col)] == level).astype(float))
                names.append(f"{col}={level}")
        return np.stack(columns, axis=1), y, names
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


def flamby_split(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FLamby's per-centre split of ``len(y)`` rows: (train indices, test indices), sorted."""
    classes, counts = np.unique(y, return_counts=True)
    stratify = y if len(classes) > 1 and (counts > FLAMBY_MIN_CLASS).all() else None
    _, test = train_test_split(
        np.arange(len(y)), test_size=1.0 - FLAMBY_TRAIN_FRACTION,
        train_size=FLAMBY_TRAIN_FRACTION, random_state=FLAMBY_SEED, shuffle=True,
        stratify=stratify,
    )
    # FLamby labels every row that is not a test row "train"
    is_test = np.zeros(len(y), dtype=bool)
    is_test[test] = True
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


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
    protocol = cfg.task.protocol
    table = read_site_file(_site_path(cfg, site))
    if protocol == "flamby":
        _check_flamby_split(cfg)
        x, y, names = encode(table, protocol)
        train, test = flamby_split(y)
        # FLamby's split on FLamby's rows keeps the test sets exactly FLamby's; a training
        # line that repeats a test line (the same patient twice) is dropped from training
        keys = _line_keys(table[kept_rows(table, protocol)])
        in_test = {keys[i] for i in test}
        leaked = np.array([keys[i] in in_test for i in train], dtype=bool)
        if leaked.any():
            log(INFO, "fedclinic: heart_disease %s: dropped %d training line(s) repeating a "
                "test patient", site.name, int(leaked.sum()))
        return tabular.make_site(site.name, x, y, 0.0, FLAMBY_SEED, names,
                                 split=(train[~leaked], test), val_fraction=_val_fraction(cfg))
    table, dropped = drop_duplicate_lines(table)
    if dropped:
        log(INFO, "fedclinic: heart_disease %s: dropped %d duplicated patient line(s) before "
            "splitting", site.name, dropped)
    x, y, names = encode(table, protocol)
    seed = DEFAULT_SPLIT_SEED if cfg.task.split_seed is None else cfg.task.split_seed
    return tabular.make_site(site.name, x, y, cfg.task.test_fraction, seed, names,
                             val_fraction=_val_fraction(cfg))


def _val_fraction(cfg: DictConfig) -> float:
    return float(cfg.task.get("val_fraction", 0.0))


def _check_flamby_split(cfg: DictConfig) -> None:
    """``protocol=flamby`` is FLamby's fixed split: refuse a different seed or test share."""
    seed, fraction = cfg.task.split_seed, cfg.task.test_fraction
    if seed not in (None, FLAMBY_SEED) or not math.isclose(
        fraction, 1.0 - FLAMBY_TRAIN_FRACTION, abs_tol=1e-9
    ):
        raise DataError(
            f"task.protocol=flamby is FLamby's fixed split (random_state={FLAMBY_SEED}, "
            f"test_fraction {1 - FLAMBY_TRAIN_FRACTION:.2f}); got split_seed={seed}, "
            f"test_fraction={fraction}: use task.protocol=flamby_sizes or impute for another "
            "split"
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
