"""Smoke tests of the cost and scale benchmarks at ``--tiny`` (real runs; no speed asserted).

Each starts real Flower simulations (Ray) as commands, as a user runs them, so both are e2e.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import cost, scale

pytestmark = pytest.mark.e2e


def test_cost_tiny_writes_every_ratio(tmp_path: Path) -> None:
    assert cost.main(["--out", str(tmp_path), "--tiny"]) == 0
    result = json.loads((tmp_path / "cost.json").read_text())
    fl = result["fl_vs_centralized"]
    assert [r["returncode"] for r in fl["runs"]] == [0, 0, 0]
    assert set(fl["ratios"]) == {"F", "I"}
    # every side trained and was measured (CPU seconds and memory of its process tree)
    for side in fl["sides"].values():
        assert side["cpu_s"] > 0 and side["peak_rss_bytes"] > 0
    # the federated run's phases were read from its log
    ray = fl["sides"]["F"]["phases"]
    assert ray[cost.STARTUP] > 0 and ray["train exchanges"] > 0
    assert ray["evaluate exchanges"] > 0
    dp = {r["mode"]: r for r in result["dp_step"]["rows"]}
    assert dp["non-private"]["status"] == dp["hooks"]["status"] == "ok"
    assert dp["ghost"]["max_abs_diff_vs_hooks"] < 1e-5  # every mode clips the same gradient
    secagg = {r["option"]: r for r in result["secure_aggregation"]["rows"]}
    assert secagg["secaggplus"]["upload_ratio"] > 1  # masked vectors are larger
    table = (tmp_path / "cost.md").read_text()
    for row in ("| federated (Ray simulation) |", "| centralized | ", "| hooks |",
                "| secaggplus | 3 |", "| train exchanges |"):
        assert row in table, row


def test_scale_tiny_writes_memory_and_round_times(tmp_path: Path) -> None:
    assert scale.main(["--out", str(tmp_path), "--tiny"]) == 0
    rows = json.loads((tmp_path / "scale.json").read_text())["rows"]
    assert [(r["task"], r["hospitals"], r["status"]) for r in rows] == [
        ("breast_cancer", 3, "ok")]
    # the driver, Ray's daemons and the actors: more than one process, real memory
    assert rows[0]["peak_processes"] > 3 and rows[0]["peak_rss_bytes"] > 2**28
    assert rows[0]["round1_s"] > 0 and rows[0]["startup_s"] > 0
    assert "| breast_cancer | 3 |" in (tmp_path / "scale.md").read_text()
