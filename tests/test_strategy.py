"""The strategy factory: Flower's strategies, weighted by the true number of examples."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

import strategies
from fl_app.config import compose_config
from fl_app.metrics import SiteMetricsCollector
from strategies.compression import Compression
from strategies.validation import UpdateValidation
from strategies.wrapper import innermost, unwrap

pytestmark = pytest.mark.usefixtures("task_identity")  # tests/conftest.py


def _reply(weights: np.ndarray, num_examples: int, site: str, loss: float) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(weights)}),
            "metrics": MetricRecord({"train_loss": loss, "num-examples": num_examples}),
            "site": ConfigRecord({"name": site}),
        }
    )
    return Message(content, dst_node_id=0, message_type=MessageType.TRAIN)


@pytest.mark.parametrize(
    ("name", "cls"), [("fedavg", FedAvg), ("fedprox", FedProx), ("fedadam", FedAdam)]
)
def test_factory_builds_flower_strategies(name: str, cls: type) -> None:
    strategy = strategies.build(compose_config(f"strategy={name}"), num_sites=4)
    # outermost: compression (bytes per message), then validation (enabled by default)
    assert [type(s) for s in unwrap(strategy)][:2] == [Compression, UpdateValidation]
    strategy = innermost(strategy)
    assert isinstance(strategy, cls)  # Flower's class (ours: FedAdam keeping the dtypes)
    assert strategy.min_available_nodes == 4
    if name == "fedprox":
        assert strategy.proximal_mu == 0.1


def test_aggregate_is_weighted_by_training_examples() -> None:
    collector = SiteMetricsCollector()
    strategy = strategies.build(
        compose_config(""), num_sites=3, train_metrics_aggr_fn=collector.train
    )
    updates = [np.array([1.0, 0.0]), np.array([0.0, 1.0]), np.array([4.0, 4.0])]
    sizes = [10, 30, 60]
    replies = [
        _reply(u, n, f"site-{i}", float(i))
        for i, (u, n) in enumerate(zip(updates, sizes, strict=True))
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    expected = sum(n * u for u, n in zip(updates, sizes, strict=True)) / sum(sizes)
    np.testing.assert_allclose(arrays["w"].numpy(), expected, rtol=1e-6)
    assert metrics["train_loss"] == pytest.approx((0 * 10 + 1 * 30 + 2 * 60) / 100)
    assert collector.last_train["site-2"]["num-examples"] == 60


def test_unknown_strategy_is_rejected() -> None:
    cfg = compose_config("")
    cfg.strategy.name = "fedsgd"
    with pytest.raises(ValueError, match="unknown strategy 'fedsgd'"):
        strategies.build(cfg, num_sites=2)


def test_fedadam_keeps_the_models_dtype_so_later_rounds_pass_validation() -> None:
    """Flower's Adam step computes in float64; a float32 model must stay float32, or every
    float32 site reply of the next round fails validation's dtype check."""
    strategy = strategies.build(compose_config("strategy=fedadam"), num_sites=2)
    arrays = ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))})
    for server_round in (1, 2, 3):
        list(strategy.configure_train(server_round, arrays, ConfigRecord(), _Grid()))
        replies = [_reply(np.full(3, float(i + server_round), dtype=np.float32), 10, f"site-{i}",
                          0.0) for i in range(2)]
        arrays, _ = strategy.aggregate_train(server_round, replies)
        assert arrays is not None, f"round {server_round} skipped"
        assert arrays["w"].numpy().dtype == np.float32


class _Grid:
    """Two connected nodes, enough for configure_train's sampling."""

    def get_node_ids(self) -> list[int]:
        return [1, 2]

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type,
                       group_id=group_id)
