"""End to end through the real Flower CLI: `flwr run .` on a local simulation SuperLink."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.deploy_harness import REPO, free_port, port_is_free
from tests.flwr_cli import VENV_BIN, flwr_env, stop_superlink, superlink_pids

pytestmark = pytest.mark.e2e


@pytest.fixture
def isolated_flwr(tmp_path: Path):
    """An own FLWR_HOME and port; whatever SuperLink gets started there is stopped after."""
    port = free_port()
    env = flwr_env(tmp_path / "flwr-home", port)
    yield env, port
    stop_superlink(port)
    assert not superlink_pids(port), "the local SuperLink outlived the test"


def test_heart_disease_fedavg_through_flwr_run(
    isolated_flwr, shared_data: Path, tmp_path: Path
) -> None:
    env, port = isolated_flwr
    out = tmp_path / "runs"
    overrides = (
        f"task=heart_disease task.data_dir={shared_data / 'heart_disease'} "
        f"num_rounds=20 output_dir={out}"
    )
    proc = subprocess.run(
        ["scripts/flwr_local.sh", *overrides.split()],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    # The wrapper stopped the SuperLink it started, and the port is free again.
    assert not superlink_pids(port)
    assert port_is_free(port)

    assert "[round 1/20]" in log and "[round 20/20]" in log
    for site in ("cleveland", "hungary", "switzerland", "va"):
        assert f"    {site}" in log  # per-site progress lines
    run_dir = Path(log.split("fedclinic: run folder: ")[-1].split()[0])
    assert run_dir.parent == out
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "summary.json",
        "final_model.pt",
        "plots/metrics.png",
        "checkpoints/latest.pt",
    ):
        assert (run_dir / name).is_file(), name

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 20
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["per_site"]) == {"cleveland", "hungary", "switzerland", "va"}
    # FLamby's exact split (task.protocol=flamby): 0.755 and AUC 0.852 in simulation
    # (FLamby reports FedAvg 0.685, pooled training 0.735)
    assert summary["mean_site_accuracy"] >= 0.72, summary
    assert summary["pooled"]["auc"] >= 0.82
    assert summary["per_site"]["cleveland"]["num-examples"] == 104


def test_bad_override_fails_before_training_with_a_clear_message(
    isolated_flwr, tmp_path: Path
) -> None:
    env, _ = isolated_flwr
    proc = subprocess.run(
        [
            str(VENV_BIN / "flwr"),
            "run",
            ".",
            "--stream",
            "--run-config",
            f'overrides="strategy=fedsgd output_dir={tmp_path}"',
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    log = proc.stdout + proc.stderr
    assert ("invalid override 'strategy=fedsgd': 'strategy' must be one of: bulyan, fedadam, "
            "fedavg, fedprox") in log
    assert "Traceback" not in log
    assert not list(tmp_path.glob("*/metrics.jsonl"))
