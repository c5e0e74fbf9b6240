"""Honest exit status: a run that fails exits non-zero with the reason as the last line,
from `python -m fl_app` and from `scripts/flwr_local.sh` (which asks the SuperLink how the
run ended); summary.json says `failed` where a run folder exists."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy_harness import REPO, free_port
from tests.flwr_cli import flwr_env, stop_superlink, superlink_pids

# A run that fails after its folder exists: site-0's ClientApp raises in round 1 (fault
# injection) and on_site_failure=stop ends the run at the first failure.
FAILING_RUN = "+faults.site-0=crash:1 on_site_failure=stop num_rounds=1"
MISSING_DATA = "task=heart_disease task.data_dir=/nonexistent"


def _last_line(proc: subprocess.CompletedProcess[str]) -> str:
    return (proc.stdout + proc.stderr).strip().splitlines()[-1]


def _python_m_fl_app(overrides: str, env: dict[str, str] | None = None,
                     ) -> subprocess.CompletedProcess[str]:
    # stderr after stdout: the reason, printed last to stderr, is the last line of both.
    return subprocess.run([sys.executable, "-m", "fl_app", *overrides.split()], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600, check=False)


def test_python_m_fl_app_wrong_override_exits_non_zero_with_the_reason_last() -> None:
    proc = _python_m_fl_app("num_rounds=abc")
    assert proc.returncode == 1
    assert _last_line(proc).startswith("fedclinic: invalid override 'num_rounds=abc': "
                                       "'num_rounds' expects int")
    assert "Traceback" not in proc.stderr


@pytest.mark.e2e
def test_python_m_fl_app_missing_data_and_failed_run_exit_non_zero(tmp_path: Path) -> None:
    proc = _python_m_fl_app(f"{MISSING_DATA} output_dir={tmp_path}")
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "task.data_dir '/nonexistent' is not a folder" in _last_line(proc)
    assert _last_line(proc).startswith("fedclinic: run failed: ")

    proc = _python_m_fl_app(f"{FAILING_RUN} output_dir={tmp_path}")
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "on_site_failure=stop ends the run" in _last_line(proc)
    (summary_file,) = tmp_path.glob("*/summary.json")
    summary = json.loads(summary_file.read_text())
    assert summary["status"] == "failed"
    assert "site-0" in summary["reason"] and summary["rounds_completed"] == 0


@pytest.fixture
def local_env(tmp_path: Path):
    """flwr_local.sh with its own FLWR_HOME and port; its SuperLink is gone afterwards."""
    port = free_port()
    yield flwr_env(tmp_path / "flwr-home", port)
    stop_superlink(port)
    assert not superlink_pids(port), "the local SuperLink outlived the test"


def _flwr_local(overrides: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["scripts/flwr_local.sh", *overrides.split()], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600, check=False)


def test_flwr_local_wrong_override_exits_non_zero(local_env: dict[str, str]) -> None:
    proc = _flwr_local("privacy=local_dp privacy.delta=1e-5", local_env)
    assert proc.returncode != 0
    assert _last_line(proc) == (
        "fedclinic: invalid override 'privacy.delta=1e-5': unknown key 'privacy.delta'. Valid "
        "keys under 'privacy': accountant, budget, grad_sample_mode, ledger_scope, max_grad_norm, "
        "mechanism, name, noise_multiplier, secure_mode, site_state_dir, target_delta, "
        "target_epsilon")


@pytest.mark.e2e
def test_flwr_local_missing_data_and_failed_run_exit_non_zero(
    local_env: dict[str, str], tmp_path: Path
) -> None:
    proc = _flwr_local(f"{MISSING_DATA} output_dir={tmp_path}", local_env)
    assert proc.returncode == 1, (proc.stdout + proc.stderr)[-3000:]
    last = _last_line(proc)
    assert last.startswith("fedclinic: run failed: run ") and "finished:failed" in last
    assert "task.data_dir '/nonexistent' is not a folder" in last
    assert "Traceback" not in proc.stdout + proc.stderr

    proc = _flwr_local(f"{FAILING_RUN} output_dir={tmp_path}", local_env)
    assert proc.returncode == 1, (proc.stdout + proc.stderr)[-3000:]
    assert "finished:failed" in _last_line(proc)
    assert "on_site_failure=stop ends the run" in _last_line(proc)
    (summary_file,) = tmp_path.glob("*/summary.json")
    assert json.loads(summary_file.read_text())["status"] == "failed"
