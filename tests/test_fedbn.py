"""FedBN: normalisation layers stay at each site (strategies/fedbn.py).

The site side runs the real ClientApp train handler under ``fedbn_mod``; the end-to-end test
runs a real multi-round Flower simulation and reads what each site reported.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAvg
from torch import nn

from fl_app.client_app import train as train_handler
from fl_app.config import compose_config, to_json
from fl_app.site_runtime import CONFIG_KEY
from strategies.fedbn import (
    METRIC_END,
    METRIC_ROUNDS,
    METRIC_START,
    STATE_KEY,
    FedBN,
    fedbn_mod,
    norm_state_keys,
)
from tasks import SiteRef, get_task


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower stamps new messages with the process's run/node/task ids (set by its runtime)."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def test_norm_state_keys_cover_every_normalisation_layer() -> None:
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.GroupNorm(2, 4),
        nn.InstanceNorm2d(4, affine=True), nn.Flatten(), nn.LayerNorm(4), nn.Linear(4, 2),
    )
    keys = set(norm_state_keys(model))
    assert keys == {
        "1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked",
        "2.weight", "2.bias", "3.weight", "3.bias", "5.weight", "5.bias",
    }
    assert set(model.state_dict()) - keys == {"0.weight", "0.bias", "6.weight", "6.bias"}


def _reply(arrays: dict[str, np.ndarray], n: int) -> Message:
    content = RecordDict({
        "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
        "metrics": MetricRecord({"num-examples": n}),
    })
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)


def test_server_keeps_global_entries_for_keys_sites_did_not_send(task_identity: None) -> None:
    global_arrays = ArrayRecord({
        "conv.weight": Array(np.zeros(3, np.float32)),
        "bn.weight": Array(np.full(2, 0.7, np.float32)),
        "bn.num_batches_tracked": Array(np.array(5, np.int64)),
    })
    strategy = FedBN(FedAvg(min_available_nodes=2))
    strategy._global = global_arrays  # what configure_train records for the round
    replies = [_reply({"conv.weight": np.ones(3, np.float32)}, 100),
               _reply({"conv.weight": np.full(3, 4.0, np.float32)}, 300)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert list(arrays.keys()) == list(global_arrays.keys())
    assert np.allclose(arrays["conv.weight"].numpy(), 0.25 * 1 + 0.75 * 4)
    assert np.array_equal(arrays["bn.weight"].numpy(), global_arrays["bn.weight"].numpy())
    assert arrays["bn.num_batches_tracked"].numpy().dtype == np.int64


def _train_message(cfg, arrays: ArrayRecord, server_round: int) -> Message:
    config = ConfigRecord({CONFIG_KEY: to_json(cfg), "server-round": server_round})
    content = RecordDict({"arrays": arrays, "config": config})
    return Message(content, dst_node_id=7, message_type=MessageType.TRAIN)


def test_site_keeps_its_norm_layers_in_context_state(
    shared_data: Path, task_identity: None
) -> None:
    """Real train handler under fedbn_mod, two rounds at one site."""
    cfg = compose_config(
        f"task=mammography task.data_dir={shared_data / 'mammography'} partition=iid "
        "partition.num_sites=3 task.model=cnn task.norm=batch task.cnn_widths=[8,16] "
        "task.local_epochs=1 task.augment.enabled=false task.image_size=64 fedbn=true"
    )
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 3},
                      state=RecordDict(), run_config={})
    task = get_task("mammography")
    torch.manual_seed(0)
    info = task.load_site(cfg, SiteRef("site-0", index=0)).info
    global_model = task.build_model(cfg, info)
    keys = norm_state_keys(global_model)
    assert keys and any(k.endswith("running_mean") for k in keys)
    global_arrays = ArrayRecord(global_model.state_dict())

    reply = fedbn_mod(_train_message(cfg, global_arrays, 1), context, train_handler)
    assert not reply.has_error()
    sent = reply.content["arrays"]
    assert not set(keys) & set(sent.keys())  # no normalisation entry leaves the site
    assert set(sent.keys()) == set(global_arrays.keys()) - set(keys)
    local = context.state[STATE_KEY]
    assert set(local.keys()) == set(keys)
    drift = float(reply.content["metrics"][METRIC_END])
    assert reply.content["metrics"][METRIC_START] == 0.0 and drift > 0
    for key in keys:  # trained locally: differs from the global model's entry
        if key.endswith(("running_mean", "running_var", "weight")):
            assert not np.array_equal(local[key].numpy(), global_arrays[key].numpy()), key

    # round 2: the server sends its (initial) norm entries again; the site must use its own
    kept = {k: local[k].numpy().copy() for k in keys}
    reply2 = fedbn_mod(_train_message(cfg, global_arrays, 2), context, train_handler)
    metrics = reply2.content["metrics"]
    assert metrics[METRIC_START] == pytest.approx(drift, rel=1e-9)
    assert metrics[METRIC_ROUNDS] == 2
    # BatchNorm counts its batches: round 2 started from the site's own count
    batches = "features.1.num_batches_tracked"
    assert batches in keys
    assert context.state[STATE_KEY][batches].numpy() == 2 * kept[batches]
    assert int(global_arrays[batches].numpy()) == 0


def test_fedbn_end_to_end_simulation(shared_data: Path, tmp_path: Path) -> None:
    """Real Flower simulation, 2 sites, 3 rounds, BatchNorm CNN with fedbn=true."""
    from fl_app.simulation import simulate

    cfg = compose_config(
        f"task=chest_xray task.data_dir={shared_data / 'chest_xray'} partition=dirichlet "
        "partition.alpha=0.5 partition.num_sites=2 num_rounds=3 task.norm=batch "
        f"task.cnn_widths=[8,16] fedbn=true output_dir={tmp_path}"
    )
    run = simulate(cfg, num_cpus=2)
    lines = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 3
    for site in ("site-0", "site-1"):
        train = [line["train"][site] for line in lines]
        assert train[0][METRIC_START] == 0.0
        assert all(t[METRIC_END] > 0 for t in train)  # differs from the global model's
        for before, after in itertools.pairwise(train):
            # what the site kept at the end of round r is what it starts round r+1 with
            assert after[METRIC_START] == pytest.approx(before[METRIC_END], rel=1e-9)
        assert [t[METRIC_ROUNDS] for t in train] == [1, 2, 3]
    ends = [line["train"]["site-0"][METRIC_END] for line in lines]
    assert ends != [line["train"]["site-1"][METRIC_END] for line in lines]
    # the server never received normalisation entries: the global ones are still the initial
    # ones (BatchNorm starts at weight 1, bias 0, mean 0, var 1, 0 batches), the rest trained
    final = torch.load(run.path / "final_model.pt")
    fresh = get_task("chest_xray").build_model(cfg, {"image_size": 28})
    initial = fresh.state_dict()
    for key in norm_state_keys(fresh):
        assert torch.equal(final[key], initial[key]), key
    assert not torch.allclose(final["features.0.weight"], initial["features.0.weight"])
    assert lines[-1]["pooled"]["num-examples"] == 624
