"""Experiment tracking (fl_app/tracking.py): a real run read back with MLflow's own client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fl_app.config import compose_config
from fl_app.run_folder import RunFolder
from fl_app.tracking import Tracker, flatten, local_store, round_metrics

REPO = Path(__file__).resolve().parents[1]


def _client(output_dir: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=local_store(output_dir)[0])


def _only_run(client):
    experiment = client.get_experiment_by_name("fedclinic")
    (run,) = client.search_runs([experiment.experiment_id])
    return run


@pytest.mark.e2e
def test_mlflow_reads_back_a_tracked_federated_run(small_federated_run: Path) -> None:
    """tracking=mlflow: params from the config, per-round pooled and per-site metrics, the
    run folder as artifacts, status tags; all read back with mlflow.tracking.MlflowClient."""
    client = _client(small_federated_run.parent)
    run = _only_run(client)
    lines = [json.loads(x)
             for x in (small_federated_run / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((small_federated_run / "summary.json").read_text())
    assert run.info.status == "FINISHED" and run.info.run_name == small_federated_run.name
    assert run.data.tags["status"] == "completed"
    assert run.data.tags["run_dir"] == str(small_federated_run)
    params = run.data.params
    assert params["task.name"] == "breast_cancer" and params["num_rounds"] == "2"
    assert params["partition.num_sites"] == "4" and params["tracking.name"] == "mlflow"
    assert params["task.lr"] == str(compose_config("").task.lr)
    for key, value in (("pooled/auc", lambda x: x["pooled"]["auc"]),
                       ("site/site-2/accuracy", lambda x: x["per_site"]["site-2"]["accuracy"]),
                       ("train/site-0/train_loss", lambda x: x["train"]["site-0"]["train_loss"])):
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [1, 2], key
        assert [m.value for m in history] == pytest.approx([value(x) for x in lines]), key
    assert run.data.metrics["final/mean_site_auc"] == pytest.approx(summary["mean_site_auc"])
    assert run.data.metrics["final/pooled/accuracy"] == pytest.approx(
        summary["pooled"]["accuracy"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "metrics.jsonl", "summary.json", "sites.json"} <= artifacts


def test_metric_and_param_names() -> None:
    line = {"round": 3, "pooled": {"auc": 0.9, "num-examples": 7},
            "per_site": {"va": {"accuracy": 0.8, "auc": None}, "St Mary's": {"auc": 0.7}},
            "train": {"va": {"x": True}}}
    assert round_metrics(line) == {"pooled/auc": 0.9, "pooled/num-examples": 7.0,
                                   "site/va/accuracy": 0.8, "site/St Mary_s/auc": 0.7}
    assert flatten({"task": {"lr": 0.05, "widths": [8, 16], "dir": None}, "name": "x"}) == {
        "task.lr": "0.05", "task.widths": "[8, 16]", "task.dir": "null", "name": "x"}


def test_tracking_none_never_imports_mlflow() -> None:
    """The default (tracking=none): a whole server-side run path imports no MLflow."""
    code = ("import sys; from fl_app.config import compose_config; "
            "import fl_app.server_app, fl_app.centralized; "
            "from fl_app.tracking import Tracker; t = Tracker(compose_config('')); "
            "t.start(None); t.log_round({'round': 1}); t.end(None); "
            "print('mlflow' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.stdout.split()[-1] == "False"


def test_centralized_and_failed_runs_are_tracked(tmp_path: Path) -> None:
    """A centralized run is tracked like a federated one; the end of a failed run gives
    the status tag and MLflow status FAILED, with the run folder still logged."""
    from fl_app.centralized import run_centralized

    run = run_centralized(compose_config(
        f"partition.num_sites=2 num_rounds=2 tracking=mlflow output_dir={tmp_path}")).path
    client = _client(tmp_path)
    tracked = _only_run(client)
    assert tracked.info.status == "FINISHED" and tracked.info.run_name == run.name
    assert tracked.data.params["strategy.name"] == "centralized"
    history = client.get_metric_history(tracked.info.run_id, "site/site-1/auc")
    assert [m.step for m in history] == [1, 2]

    cfg = compose_config(f"tracking=mlflow tracking.run_name=broken output_dir={tmp_path}")
    failed = RunFolder.create(cfg)
    tracker = Tracker(cfg)
    tracker.start(failed)
    tracker.log_round({"round": 1, "pooled": {"accuracy": 0.5, "num-examples": 10},
                       "per_site": {"site-0": {"accuracy": 0.5}}, "train": {}})
    failed.write_json("summary.json", {"status": "failed", "reason": "site-0 crashed"})
    tracker.end(failed)
    experiment = client.get_experiment_by_name("fedclinic")
    (broken,) = client.search_runs([experiment.experiment_id],
                                   "attributes.run_name = 'broken'")
    assert broken.info.status == "FAILED"
    assert broken.data.tags["status"] == "failed"
    assert broken.data.tags["reason"] == "site-0 crashed"
    assert broken.data.metrics["site/site-0/accuracy"] == 0.5
    assert "summary.json" in {a.path for a in client.list_artifacts(broken.info.run_id)}
