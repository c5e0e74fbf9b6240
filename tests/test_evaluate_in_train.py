"""evaluate_in_train: the model after round r is evaluated inside round r+1's train message.

The same heart-disease experiment (real UCI files, four hospitals, simulation) runs with and
without it; every metrics.jsonl line must be the same up to float rounding: the per-round
metrics keep their meaning, only the messages that carry them change.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fl_app.config import compose_config
from fl_app.simulation import simulate
from strategies import evaluate_in_train

pytestmark = pytest.mark.e2e


def _lines(shared_data: Path, tmp_path: Path, on: bool) -> list[dict[str, Any]]:
    cfg = compose_config(f"task=heart_disease task.data_dir={shared_data / 'heart_disease'} "
                         f"num_rounds=3 evaluate_in_train={str(on).lower()} "
                         f"output_dir={tmp_path / str(on)}")
    assert evaluate_in_train.enabled(cfg) is on
    run = simulate(cfg, num_cpus=2)
    return [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines()]


def _same(a: Any, b: Any) -> bool:
    """Equal up to float rounding (NaN is written as null)."""
    return (a is None and b is None) or (a is not None and b == pytest.approx(a, rel=1e-6,
                                                                             abs=1e-9))


def test_round_metrics_are_the_same_with_evaluation_inside_training(
    shared_data: Path, tmp_path: Path
) -> None:
    separate = _lines(shared_data, tmp_path, on=False)
    inside = _lines(shared_data, tmp_path, on=True)
    assert [x["round"] for x in inside] == [x["round"] for x in separate] == [1, 2, 3]
    for a, b in zip(separate, inside, strict=True):
        assert set(b["per_site"]) == set(a["per_site"]) == {"cleveland", "hungary",
                                                             "switzerland", "va"}
        assert b["missing_sites"] == [] and a["missing_sites"] == []
        for site, metrics in a["per_site"].items():
            for key, value in metrics.items():
                assert _same(value, b["per_site"][site][key]), (a["round"], site, key)
        for key, value in a["pooled"].items():
            assert _same(value, b["pooled"][key]), (a["round"], key)
        assert b["train"].keys() == a["train"].keys()


def test_it_is_off_by_default_and_steps_aside_where_it_would_change_something() -> None:
    """Off unless asked for; with partial participation (or secure aggregation) evaluate
    messages as before."""
    assert not evaluate_in_train.enabled(compose_config("task=heart_disease"))  # default
    assert evaluate_in_train.enabled(compose_config("task=heart_disease evaluate_in_train=true"))
    assert not evaluate_in_train.enabled(compose_config(
        "task=heart_disease evaluate_in_train=true strategy.fraction_evaluate=0.5"))
