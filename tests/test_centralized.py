"""Centralized baseline (fl_app/centralized.py): pooled training, same run-folder format."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fl_app.centralized import load_sites, main, run_centralized
from fl_app.config import ConfigError, compose_config
from tasks import engine, get_task

REPO = Path(__file__).resolve().parents[1]


def test_chest_xray_baseline_writes_the_run_folder_of_a_federated_run(
    shared_data: Path, tmp_path: Path
) -> None:
    cfg = compose_config(
        f"task=chest_xray task.data_dir={shared_data / 'chest_xray'} partition=dirichlet "
        f"partition.alpha=0.5 partition.num_sites=5 num_rounds=2 output_dir={tmp_path}"
    )
    run = run_centralized(cfg).path
    assert run.name.endswith("_chest_xray_centralized")
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "final_model.pt",
                 "plots/metrics.png", "sites.json"):
        assert (run / name).is_file(), name
    assert "name: centralized" in (run / "config.yaml").read_text()
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [1, 2]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["strategy"] == "centralized" and summary["epochs"] == 2
    assert sorted(summary["per_site"]) == [f"site-{i}" for i in range(5)]
    sites = json.loads((run / "sites.json").read_text())["sites"]
    assert sum(s["num_train"] for s in sites) == 4708  # the whole official train split
    assert summary["pooled"]["num-examples"] == 624  # the whole official test split
    assert summary["pooled"]["auc"] >= 0.90
    text = (run / "report.md").read_text()  # the run report of the baseline
    assert "Centralized baseline" in text and "| **all hospitals** |" in text
    assert f"| pooled AUC | {summary['pooled']['auc']:.3f} |" in text
    accuracies = [m["accuracy"] for m in summary["per_site"].values()]
    assert summary["mean_site_accuracy"] == pytest.approx(sum(accuracies) / 5)
    # per-site metrics are the final model on that site's test share
    model = get_task("chest_xray").build_model(cfg, {"image_size": 28})
    model.load_state_dict(torch.load(run / "final_model.pt"))
    site = load_sites(cfg)[3]
    metrics = engine.evaluate(model, engine.make_loader(site.test, 256, False, 0),
                              torch.device("cpu"))
    assert metrics["num-examples"] == summary["per_site"]["site-3"]["num-examples"]
    assert metrics["auc"] == pytest.approx(summary["per_site"]["site-3"]["auc"], abs=1e-6)


def test_one_command_baseline_for_a_tabular_task(shared_data: Path, tmp_path: Path) -> None:
    """``python -m fl_app.centralized`` on heart disease: natural sites, federated statistics."""
    done = subprocess.run(
        [sys.executable, "-m", "fl_app.centralized", "task=heart_disease",
         f"task.data_dir={shared_data / 'heart_disease'}", "num_rounds=3",
         f"output_dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    run = Path(done.stdout.strip().splitlines()[-1].split("run folder: ")[1])
    summary = json.loads((run / "summary.json").read_text())
    assert sorted(summary["per_site"]) == ["cleveland", "hungary", "switzerland", "va"]
    assert summary["pooled"]["num-examples"] == sum(
        m["num-examples"] for m in summary["per_site"].values()
    )
    assert 0.7 <= summary["pooled"]["auc"] <= 1.0


def test_baseline_refuses_differential_privacy(shared_data: Path, tmp_path: Path) -> None:
    cfg = compose_config(f"task=heart_disease task.data_dir={shared_data / 'heart_disease'} "
                         f"privacy=local_dp output_dir={tmp_path}")
    with pytest.raises(ConfigError, match="without differential privacy"):
        run_centralized(cfg)
    assert not any(tmp_path.iterdir())  # no half-made run folder


@pytest.mark.e2e
def test_baseline_takes_the_sites_of_the_federated_run(
    small_federated_run: Path, tmp_path: Path
) -> None:
    """compare_with=<run folder>: the baseline's sites and pooled test set are the run's
    (partition.num_sites left null here: the four sites come from the run folder)."""
    federated = json.loads((small_federated_run / "summary.json").read_text())
    fed_sites = json.loads((small_federated_run / "sites.json").read_text())["sites"]
    assert len(fed_sites) == 4  # not the 3 the baseline used to assume
    assert main([f"compare_with={small_federated_run}", "num_rounds=2",
                 f"output_dir={tmp_path}"]) == 0
    (run,) = tmp_path.iterdir()
    sites = json.loads((run / "sites.json").read_text())
    assert sites["sites"] == fed_sites
    assert sites["compared_with"] == str(small_federated_run)
    summary = json.loads((run / "summary.json").read_text())
    assert sorted(summary["per_site"]) == sorted(federated["per_site"])
    assert summary["pooled"]["num-examples"] == federated["pooled"]["num-examples"]
    # the per-site summary of a federated run (fl_app.results.site_summary) is there too
    assert summary["mean_site_auc"] == pytest.approx(
        sum(m["auc"] for m in summary["per_site"].values()) / 4)
    assert summary["one_class_sites"] == 0
    assert summary["worst_site"]["auc"]["site"] in summary["per_site"]


@pytest.mark.e2e
def test_baseline_refuses_sites_unlike_the_federated_run(
    small_federated_run: Path, tmp_path: Path
) -> None:
    cfg = compose_config(f"partition.num_sites=4 partition=dirichlet output_dir={tmp_path}")
    with pytest.raises(ConfigError, match=r"sites differ from the federated run's.*site-0"):
        run_centralized(cfg, compare_with=small_federated_run)
    assert not any(tmp_path.iterdir())


def test_baseline_needs_the_number_of_sites(tmp_path: Path) -> None:
    """partition.num_sites null means one site per SuperNode: the baseline must be told."""
    with pytest.raises(ConfigError, match=r"partition\.num_sites is null.*compare_with="):
        run_centralized(compose_config(f"output_dir={tmp_path}"))
    assert main([f"output_dir={tmp_path}", "num_rounds=1"]) == 1
    assert not any(tmp_path.iterdir())
