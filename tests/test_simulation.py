"""In-process simulation (the Hydra CLI's path): strategies other than FedAvg, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fl_app.config import compose_config
from fl_app.simulation import simulate

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("strategy", ["fedprox", "fedadam"])
def test_breast_cancer_label_skew_trains_with_strategy(tmp_path: Path, strategy: str) -> None:
    cfg = compose_config(f"strategy={strategy} task.model=mlp partition=dirichlet "
                         f"partition.num_sites=4 num_rounds=3 output_dir={tmp_path}")
    run = simulate(cfg)
    lines = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [1, 2, 3]
    assert set(lines[-1]["per_site"]) == {"site-0", "site-1", "site-2", "site-3"}
    assert lines[-1]["missing_sites"] == []
    summary = json.loads((run.path / "summary.json").read_text())
    assert summary["strategy"] == strategy
    assert summary["pooled"]["num-examples"] == sum(
        m["num-examples"] for m in summary["per_site"].values())
    assert summary["pooled"]["auc"] > 0.95
    assert summary["mean_site_accuracy"] > 0.85
