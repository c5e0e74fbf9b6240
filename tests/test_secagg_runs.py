"""Secure aggregation end to end through the real Flower CLI (`scripts/flwr_local.sh`).

Breast cancer across 5 simulated hospitals under SecAgg+ and under CKKS, heart disease (4 real
hospitals) with central DP (client-side clipping) under SecAgg+, and central DP composed with
CKKS, each on its own local simulation SuperLink, stopped afterwards.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant

from tests.deploy_harness import REPO, free_port
from tests.flwr_cli import flwr_env, stop_superlink, superlink_pids

pytestmark = pytest.mark.e2e


@pytest.fixture
def flwr_local(tmp_path: Path):
    """Run scripts/flwr_local.sh with an own FLWR_HOME and port; return the run folder."""
    port = free_port()
    env = flwr_env(tmp_path / "flwr-home", port)

    def run(overrides: str) -> tuple[Path, str]:
        out = tmp_path / "runs"
        proc = subprocess.run(
            ["scripts/flwr_local.sh", *overrides.split(), f"output_dir={out}"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False,
        )
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, log[-4000:]
        folder = Path(log.split("fedclinic: run folder: ")[-1].split()[0])
        assert folder.parent == out
        # `flwr run` exits 0 even when the ServerApp failed: the run's own status says
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["status"] == "completed", (summary.get("reason"), log[-3000:])
        return folder, log

    yield run
    stop_superlink(port)
    assert not superlink_pids(port), "the local SuperLink outlived the test"


def _lines(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]



def _assert_central_ledger(folder: Path, rounds: int, num_sites: int) -> None:
    """One ledger line per site and round, each with the ε of Opacus's RDP accountant for
    one Gaussian release (noise multiplier 1, every site every round) per round so far."""
    ledger = [json.loads(x) for x in (folder / "privacy_ledger.jsonl").read_text().splitlines()]
    assert len(ledger) == rounds * num_sites
    for entry in ledger:
        acc = RDPAccountant()
        acc.history = [(1.0, 1.0, entry["round"])]
        assert entry["status"] == "trained" and entry["mechanism"] == "central_dp"
        assert entry["epsilon"] == pytest.approx(acc.get_epsilon(delta=1e-5), abs=1e-6)

def test_breast_cancer_five_hospitals_under_secaggplus(flwr_local) -> None:
    folder, log = flwr_local("secagg=secaggplus partition.num_sites=5 num_rounds=5")
    sites = [f"site-{i}" for i in range(5)]
    lines = _lines(folder)
    assert [x["round"] for x in lines] == [1, 2, 3, 4, 5]
    for line in lines:
        assert line["aggregated_sites"] == sites, line  # all five in every sum
        assert set(line["train"]) == set(sites)  # training metrics stay per site
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["secure_aggregation"] == "secaggplus"
    assert summary["status"] == "completed"
    assert summary["pooled"]["accuracy"] >= 0.90, summary["pooled"]
    assert "secure aggregation (secaggplus): round 5 sum of 5 site(s) unmasked" in log


def test_heart_disease_central_dp_client_under_secaggplus(flwr_local, shared_data: Path) -> None:
    rounds = 3
    folder, log = flwr_local(
        f"task=heart_disease task.data_dir={shared_data / 'heart_disease'} "
        f"privacy=central_dp_client privacy.noise_multiplier=1.0 secagg=secaggplus "
        f"num_rounds={rounds}"
    )
    hospitals = ["cleveland", "hungary", "switzerland", "va"]
    lines = _lines(folder)
    assert len(lines) == rounds
    assert all(line["aggregated_sites"] == hospitals for line in lines)
    # one Gaussian release per round, noise calibrated to the 4 clipped updates in the sum
    assert "central DP: Gaussian noise with stdev 0.250000 added to the average of 4" in log
    _assert_central_ledger(folder, rounds, len(hospitals))
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["secure_aggregation"] == "secaggplus"
    assert summary["privacy"]["central"]["releases"] == rounds


def test_breast_cancer_five_hospitals_under_ckks(flwr_local, tmp_path: Path) -> None:
    keys = tmp_path / "simulated-hospital-keys"  # the simulated hospitals' own folder
    folder, log = flwr_local(f"secagg=ckks secagg.simulation_key_dir={keys} "
                             "partition.num_sites=5 num_rounds=5")
    sites = [f"site-{i}" for i in range(5)]
    lines = _lines(folder)
    assert [x["round"] for x in lines] == [1, 2, 3, 4, 5]
    for line in lines:
        assert line["aggregated_sites"] == sites, line
        assert set(line["train"]) == set(sites)  # training metrics stay per site
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["secure_aggregation"] == "ckks"
    assert summary["status"] == "completed"
    assert summary["pooled"]["accuracy"] >= 0.90, summary["pooled"]
    assert "5 hospital(s) hold CKKS key" in log
    assert "secure aggregation (ckks): round 5 sum of 5 site(s) unmasked" in log
    # the simulated hospitals made their key in their folder; the server never needed one
    assert (keys / "ckks-secret-context.bin").stat().st_mode & 0o077 == 0


def test_central_dp_client_composes_with_ckks(flwr_local, tmp_path: Path) -> None:
    rounds = 2
    folder, log = flwr_local(
        f"secagg=ckks secagg.simulation_key_dir={tmp_path / 'keys'} partition.num_sites=4 "
        f"privacy=central_dp_client privacy.noise_multiplier=1.0 num_rounds={rounds}"
    )
    sites = [f"site-{i}" for i in range(4)]
    assert all(line["aggregated_sites"] == sites for line in _lines(folder))
    # the noise is added once, by the server, to the decrypted average of 4 clipped updates
    assert "central DP: Gaussian noise with stdev 0.250000 added to the average of 4" in log
    _assert_central_ledger(folder, rounds, len(sites))
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["secure_aggregation"] == "ckks"
    assert summary["privacy"]["central"]["releases"] == rounds
