"""strategy=qfedavg (Flower's q-FedAvg): a real heart-disease run, and the combinations it
refuses (it needs each site's own update and training loss)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import QFedAvg as FlowerQFedAvg

import strategies
from fl_app.config import compose_config
from fl_app.errors import ConfigError
from fl_app.simulation import simulate
from strategies.factory import QFedAvg
from strategies.secure_aggregation import check_secure_aggregation


@pytest.mark.e2e  # a Flower simulation (Ray)
def test_qfedavg_heart_disease_run_completes_and_reports_the_worst_site(shared_data, tmp_path):
    cfg = compose_config(
        f"task=heart_disease task.data_dir={shared_data / 'heart_disease'} strategy=qfedavg "
        f"num_rounds=3 output_dir={tmp_path}")
    run = simulate(cfg, num_cpus=2).path
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_completed"] == 3
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    # every update kept its dtype, so validation rejected none and all four were aggregated
    assert all(not line["rejected"] and len(line["aggregated_sites"]) == 4 for line in lines)
    worst = summary["worst_site"]["accuracy"]
    assert worst["site"] in summary["per_site"] and worst["gap_to_mean"] >= 0
    # it learns, more slowly than FedAvg (its step is damped by L = 1/lr and the update norms;
    # measured on FLamby's split: mean per-site accuracy 0.615, 0.677, 0.722 over these
    # rounds, pooled loss 0.690, 0.658, 0.629; 0.801 after 10 rounds, FedAvg 0.752)
    losses = [line["pooled"]["loss"] for line in lines]
    assert losses[0] > losses[1] > losses[2]
    assert summary["mean_site_accuracy"] >= 0.05 + np.mean(
        [m["accuracy"] for m in lines[0]["per_site"].values()])
    assert "q-FedAvg" in (run / "report.md").read_text()


def test_qfedavg_is_refused_where_it_cannot_see_single_updates(shared_data):
    base = f"task=heart_disease task.data_dir={shared_data / 'heart_disease'} strategy=qfedavg"
    with pytest.raises(ConfigError, match="q-FedAvg"):
        check_secure_aggregation(compose_config(f"{base} secagg=secaggplus"))
    with pytest.raises(ValueError, match="averaging strategy"):
        strategies.build(compose_config(f"{base} privacy=central_dp"), 4)
    chain = strategies.build(compose_config(f"{base} fedbn=true privacy=local_dp"), 4)
    node: object = chain
    while hasattr(node, "strategy"):
        node = node.strategy
    assert isinstance(node, QFedAvg) and node.q == 0.1 and node.client_learning_rate == 0.05


def test_qfedavg_keeps_float32_and_integer_arrays(task_identity: None) -> None:
    """Flower's step alone turns float32 into float64 and fails on integer arrays (e.g.
    BatchNorm's batch counter); ours gives the global model's dtypes back."""
    start = {"w": np.ones(3, np.float32), "n": np.array(7, np.int64)}

    def reply(w: float, loss: float) -> Message:
        content = RecordDict({
            "arrays": ArrayRecord({"w": Array(np.full(3, w, np.float32)),
                                   "n": Array(np.array(9, np.int64))}),
            "metrics": MetricRecord({"train_loss": loss, "num-examples": 10})})
        return Message(content, dst_node_id=0, message_type="train")

    ours = QFedAvg(client_learning_rate=0.1, q=1.0)
    ours.current_arrays = ArrayRecord({k: Array(v) for k, v in start.items()})
    arrays, _ = ours.aggregate_train(1, [reply(0.5, 1.0), reply(0.0, 3.0)])
    assert arrays["w"].numpy().dtype == np.float32 and arrays["n"].numpy().dtype == np.int64
    # q-FedAvg by hand (L = 1/0.1 = 10, q = 1): per site dw = L (w - w_k) loss^q and
    # h = q loss^(q-1) |L (w - w_k)|^2 + L loss^q; step = sum dw / sum h
    dw = [10 * 0.5 * 1.0, 10 * 1.0 * 3.0]
    h = [3 * (10 * 0.5) ** 2 + 10 * 1.0, 3 * (10 * 1.0) ** 2 + 10 * 3.0]
    np.testing.assert_allclose(arrays["w"].numpy(), 1 - sum(dw) / sum(h), rtol=1e-6)
    assert int(arrays["n"].numpy()) == 9  # the counter is averaged, not stepped
    flower = FlowerQFedAvg(client_learning_rate=0.1, q=1.0)
    flower.current_arrays = ArrayRecord({k: Array(v) for k, v in start.items()})
    with pytest.raises(Exception):  # noqa: B017 - NumPy's casting error on the int array
        flower.aggregate_train(1, [reply(0.5, 1.0), reply(0.0, 3.0)])
