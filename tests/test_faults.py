"""Fault injection end to end (in-process simulation, breast cancer, 5 sites, 3 rounds).

Three of five sites misbehave: site-1 sends its update x100, site-2 one of the wrong shape,
site-3 NaN. Update validation rejects the malformed two in every round (metrics.jsonl names
each rejection); a robust aggregator copes with the scaled one; the final pooled accuracy
stays within 2 points of the clean run. Without validation the same faults break FedAvg.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fl_app.config import compose_config
from fl_app.federation_guard import SiteFailure
from fl_app.simulation import simulate

pytestmark = pytest.mark.e2e

BASE = "partition.num_sites=5 num_rounds=3"
FAULTS = "+faults.site-1=scale:100 +faults.site-2=wrong_shape +faults.site-3=nan"


def run(tmp: Path, overrides: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    folder = simulate(compose_config(f"{BASE} {overrides} output_dir={tmp}")).path
    lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    return lines, json.loads((folder / "summary.json").read_text())


def audit_rounds(tmp: Path) -> list[dict[str, Any]]:
    """The round entries of the run's audit.jsonl (fl_app/audit.py)."""
    (folder,) = tmp.iterdir()
    entries = [json.loads(x) for x in (folder / "audit.jsonl").read_text().splitlines()]
    return [e for e in entries if e["event"] == "round"]


@pytest.fixture(scope="module")
def clean_accuracy(tmp_path_factory: pytest.TempPathFactory) -> float:
    lines, summary = run(tmp_path_factory.mktemp("clean"), "")
    assert summary["status"] == "completed" and all(not x["rejected"] for x in lines)
    accuracy = float(summary["pooled"]["accuracy"])
    assert accuracy > 0.9
    return accuracy


@pytest.mark.parametrize("strategy", [
    "strategy=median",
    # after validation 3 updates remain, one scaled: cutting one value at each end of the
    # coordinate-wise order needs int(beta * 3) >= 1
    "strategy=trimmed_mean strategy.beta=0.34",
])
def test_validation_and_robust_aggregation_survive_bad_sites(
    tmp_path: Path, clean_accuracy: float, strategy: str
) -> None:
    lines, summary = run(tmp_path, f"{strategy} {FAULTS}")
    assert summary["status"] == "completed"
    for line in lines:
        assert set(line["rejected"]) == {"site-2", "site-3"}
        assert "has shape (2, 31), expected (2, 30)" in line["rejected"]["site-2"]
        assert "contains NaN" in line["rejected"]["site-3"]
        assert line["aggregated_sites"] == ["site-0", "site-1", "site-4"]
    assert summary["pooled"]["accuracy"] >= clean_accuracy - 0.02
    # the audit trail names each rejection, round by round
    audited = audit_rounds(tmp_path)
    assert [e["round"] for e in audited] == [1, 2, 3]
    assert all(e["rejected"] == line["rejected"] for e, line in zip(audited, lines, strict=True))


def test_without_validation_the_faults_break_fedavg(tmp_path: Path, clean_accuracy: float) -> None:
    # (a wrong shape crashes FedAvg's aggregation outright: tests/test_validation.py)
    with pytest.raises(SiteFailure, match="round 1 evaluate: only 0 of 5 sites returned"):
        run(tmp_path, "validation.enabled=false +faults.site-1=scale:100 +faults.site-3=nan")
    # the NaN average reached every site: none could even evaluate the global model
    (folder,) = tmp_path.iterdir()
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert "round 1 evaluate: only 0 of 5 sites returned a result" in summary["reason"]
    assert not (folder / "metrics.jsonl").exists() or not (folder / "metrics.jsonl").read_text()


def test_a_crash_and_a_timeout_do_not_stop_the_run(tmp_path: Path) -> None:
    # min_sites=4: the run goes on while 4 of the 5 sites deliver. The timed-out site sleeps
    # round_timeout_s + 2 s, so keep round_timeout_s small (the query round waits longer).
    lines, summary = run(tmp_path, "min_sites=4 round_timeout_s=30 "
                                   "+faults.site-1=crash:2 +faults.site-3=timeout:3")
    assert summary["status"] == "completed"
    everyone = ["site-0", "site-1", "site-2", "site-3", "site-4"]
    assert [x["aggregated_sites"] for x in lines] == [
        everyone,
        ["site-0", "site-2", "site-3", "site-4"],
        ["site-0", "site-1", "site-2", "site-4"],
    ]
    assert "injected fault crash:2 at site-1" in lines[1]["failures"]["site-1"]
    assert lines[2]["failures"] == {"site-3": "train: no reply within 30s"}
    assert all(len(x["per_site"]) == 5 for x in lines)  # every site evaluated every round
