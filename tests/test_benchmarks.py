"""Smoke tests of the quality and privacy-utility benchmarks at their tiny size (real data).

Numbers are never asserted as speed; the quality bars are ones a tiny run clears by a margin
(chance is an AUC of 0.5).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from benchmarks import privacy_utility, quality


def test_quality_tiny_writes_every_section(shared_data: Path, tmp_path: Path) -> None:
    assert quality.main(["--out", str(tmp_path), "--tiny"]) == 0
    result = json.loads((tmp_path / "quality.json").read_text())
    heart = {r["method"]: r for r in result["heart_disease"]["rows"]}
    assert list(heart) == ["fedavg", "median", "local only", "centralized (pooled)"]
    assert all(r["status"] == "ok" and r["seeds"] == 1 for r in heart.values())
    assert heart["fedavg"]["auc"]["mean"] >= 0.8  # 0.89 measured after 2 rounds
    assert heart["fedavg"]["flamby_accuracy"] == quality.FLAMBY["fedavg"]
    assert heart["local only"]["pooled_auc"]["mean"] is None  # four models: nothing pooled
    assert result["heart_disease"]["machine"]["cpus"] >= 1
    chest = {r["method"]: r for r in result["chest_xray"]["rows"]}
    assert list(chest) == ["federated fedavg, iid", "centralized (pooled)"]
    assert chest["federated fedavg, iid"]["pooled_auc"]["mean"] >= 0.75  # 0.85 measured
    ratio = chest["federated fedavg, iid"]["of_centralized"]
    assert math.isclose(ratio, chest["federated fedavg, iid"]["pooled_auc"]["mean"]
                        / chest["centralized (pooled)"]["pooled_auc"]["mean"])
    mammo = {r["method"]: r for r in result["mammography"]["rows"]}
    assert [r["kind"] for r in mammo.values()] == ["federated", "centralized"]
    assert all(0.0 <= r["film_auc"]["mean"] <= 1.0 for r in mammo.values())
    # a strategy added later: its row joins the section in its place, stamped with its date
    assert quality.main(["--out", str(tmp_path), "--tiny", "--sections", "heart_disease",
                         "--strategies", "trimmed_mean"]) == 0
    result = json.loads((tmp_path / "quality.json").read_text())
    rows = result["heart_disease"]["rows"]
    assert [r["method"] for r in rows] == ["fedavg", "median", "trimmed_mean", "local only",
                                           "centralized (pooled)"]
    assert rows[2]["status"] == "ok" and "date" in rows[2]["measured"]
    assert rows[0] == heart["fedavg"]
    table = (tmp_path / "quality.md").read_text()
    assert "Added later: trimmed_mean: measured" in table
    for line in ("| fedavg | 0.", "| local only |", "| centralized (pooled) |",
                 "| federated fedavg, iid |", "| patch: federated fedavg, 3 hospitals |"):
        assert line in table, line


def test_privacy_utility_tiny_writes_table_and_plot(shared_data: Path, tmp_path: Path) -> None:
    assert privacy_utility.main(["--out", str(tmp_path), "--tiny"]) == 0
    result = json.loads((tmp_path / "privacy_utility.json").read_text())
    for task in ("heart_disease", "chest_xray"):
        rows = {(r["mechanism"], str(r["epsilon"])): r for r in result[task]["rows"]}
        assert sorted(rows) == [("central_dp", "1.0"), ("central_dp", "inf"),
                                ("local_dp", "1.0"), ("local_dp", "inf")]
        for mechanism in privacy_utility.MECHANISMS:
            # the run's own ledger: at most the target, and the noise not wasted
            spent = rows[(mechanism, "1.0")]["epsilon_spent"]["mean"]
            assert 0.5 <= spent <= 1.0, (task, mechanism, spent)
            assert rows[(mechanism, "inf")]["epsilon_spent"]["mean"] is None  # no DP
        assert rows[("local_dp", "inf")]["auc"] == rows[("central_dp", "inf")]["auc"]
    heart = {(r["mechanism"], str(r["epsilon"])): r for r in result["heart_disease"]["rows"]}
    assert heart[("local_dp", "inf")]["auc"]["mean"] >= 0.8
    table = (tmp_path / "privacy_utility.md").read_text()
    assert "| 1.0 | 0." in table and "| ∞ (no DP) |" in table
    assert (tmp_path / "privacy_utility.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
