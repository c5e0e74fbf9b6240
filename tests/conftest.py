"""Shared fixtures: the real data in ../shared/data, skipped (or failed in CI) when absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    """``$FEDCLINIC_DATA_ROOT`` or ``../shared/data`` beside the repository."""
    return Path(os.environ.get("FEDCLINIC_DATA_ROOT", REPO.parent / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data root. Skips when absent; in CI (CI=true) its absence is a failure."""
    root = data_root()
    if not (root / "heart_disease").is_dir():
        message = (
            f"real data not found at {root}: put the shared data folder beside the repository "
            "(../shared/data) or set FEDCLINIC_DATA_ROOT"
        )
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return root


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower stamps new messages with the process's run/node/task ids (set by its runtime)."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


@pytest.fixture(scope="session")
def small_federated_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real federated run shared by the tests that read a finished run folder: breast
    cancer, four simulated hospitals, 2 rounds, in-process simulation, tracked with MLflow
    (``tracking=mlflow``: MLflow's local store ``mlflow.db`` beside the run folder)."""
    from fl_app.config import compose_config
    from fl_app.simulation import simulate

    out = tmp_path_factory.mktemp("federated")
    cfg = compose_config(f"partition.num_sites=4 num_rounds=2 tracking=mlflow output_dir={out}")
    return simulate(cfg).path
