"""Update validation, robust aggregation and fault injection, without Flower processes."""

from __future__ import annotations

import math

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
from flwr.serverapp.strategy import Bulyan, FedAvg, FedMedian, FedTrimmedAvg, Krum, MultiKrum
from torch.utils.data import TensorDataset

import strategies
from fl_app import faults
from fl_app.config import compose_config, to_json
from strategies.budget import PrivacyConfigError, spend_record
from strategies.central_dp import _RoundNoise
from strategies.robust import RobustConfigError
from strategies.secure_aggregation import SecureAggregationConfigError, check_secure_aggregation
from strategies.validation import (
    Reference,
    UpdateValidation,
    ValidationConfigError,
    check_reply,
    round_rejections,
    skipped_reason,
)
from strategies.wrapper import find, innermost

pytestmark = pytest.mark.usefixtures("task_identity")  # tests/conftest.py

GLOBAL = {"w": np.zeros((2, 3), dtype=np.float32), "b": np.zeros(2, dtype=np.float32)}
NODE_SITES = {1: "site-0", 2: "site-1", 3: "site-2", 4: "site-3", 5: "site-4"}
SIZES = dict.fromkeys(NODE_SITES.values(), 50)


def content(arrays: dict[str, np.ndarray], num_examples: object = 50,
            site: str = "site-0") -> RecordDict:
    return RecordDict({
        "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
        "metrics": MetricRecord({"train_loss": 0.1, "num-examples": num_examples}),
        "site": ConfigRecord({"name": site}),
    })


def update(scale: float = 1.0) -> dict[str, np.ndarray]:
    return {k: (v + scale).astype(v.dtype) for k, v in GLOBAL.items()}


REFERENCE = Reference(GLOBAL)


def reason(c: RecordDict, **kw: object) -> str | None:
    return check_reply(c, REFERENCE, **kw)[0]  # type: ignore[arg-type]


def test_a_valid_reply_passes_with_its_update_norm() -> None:
    why, norm = check_reply(content(update(0.5)), REFERENCE, max_examples=50)
    assert why is None
    assert norm == pytest.approx(math.sqrt(8 * 0.25))


@pytest.mark.parametrize(("arrays", "expected"), [
    ({**update(), "w": np.full((2, 3), np.nan, np.float32)}, "'w' contains NaN"),
    ({**update(), "b": np.array([1.0, np.inf], np.float32)}, "'b' contains Inf"),
    ({"w": update()["w"]}, "wrong keys (missing ['b']"),
    ({**update(), "extra": np.ones(1, np.float32)}, "unexpected ['extra']"),
    ({**update(), "w": np.zeros((2, 4), np.float32)}, "'w' has shape (2, 4), expected (2, 3)"),
    ({**update(), "w": np.zeros((2, 3), np.float64)}, "'w' has dtype float64, expected float32"),
])
def test_malformed_updates_are_rejected_with_the_reason(arrays: dict, expected: str) -> None:
    assert expected in (reason(content(arrays)) or "")


def test_metadata_that_lies_about_the_payload_is_rejected() -> None:
    lie = Array(np.zeros((3, 2), np.float32))
    lie.shape = (2, 3)  # declared shape matches, the payload does not
    c = content(update())
    c["arrays"]["w"] = lie
    assert "holds data of shape (3, 2)" in (reason(c) or "")
    garbage = Array(dtype="float32", shape=(2,), stype="numpy.ndarray", data=b"not npy")
    c = content(update())
    c["arrays"]["b"] = garbage
    assert "cannot be decoded" in (reason(c) or "")


@pytest.mark.parametrize(("count", "expected"), [
    (0, "not positive"), (-5, "not positive"), (51, "implausible"), (2.5, "not a whole number"),
    (float("nan"), "not a whole number"),
])
def test_implausible_example_counts_are_rejected(count: object, expected: str) -> None:
    assert expected in (reason(content(update(), num_examples=count), max_examples=50) or "")


def test_update_norm_bound() -> None:
    assert "exceeds validation.max_update_norm=1" in (
        reason(content(update(1.0)), max_update_norm=1.0) or "")
    assert reason(content(update(0.1)), max_update_norm=1.0) is None


def reply(node: int, arrays: dict[str, np.ndarray], num_examples: object = 50) -> Message:
    msg = Message(content(arrays, num_examples, NODE_SITES[node]), dst_node_id=node,
                  message_type=MessageType.TRAIN)
    msg.metadata.__dict__["_src_node_id"] = node  # as if it came from that node
    return msg


class Grid:
    def get_node_ids(self) -> list[int]:
        return list(NODE_SITES)


def validated(overrides: str = "") -> UpdateValidation:
    cfg = compose_config(f"partition.num_sites=5 {overrides}")
    strategy = strategies.build(cfg, 5, node_sites=NODE_SITES, train_sizes=SIZES)
    validation = find(strategy, UpdateValidation)
    assert validation is not None
    list(strategy.configure_train(1, ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}),
                                  ConfigRecord({"cfg": to_json(cfg)}), Grid()))
    return validation


def test_invalid_replies_are_dropped_and_the_rest_averaged() -> None:
    strategy = validated()
    replies = [reply(1, update(1.0)), reply(2, update(3.0)),
               reply(3, {**update(), "w": np.full((2, 3), np.nan, np.float32)}),
               reply(4, {**update(), "w": np.zeros((3, 3), np.float32)}),
               reply(5, update(), num_examples=10_000)]
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), np.full((2, 3), 2.0))  # sites 0 and 1
    assert {r["site"] for r in round_rejections(strategy, 1)} == {"site-2", "site-3", "site-4"}
    assert all(r["round"] == 1 and r["reason"] for r in round_rejections(strategy, 1))


def test_a_round_with_too_few_valid_replies_is_skipped() -> None:
    strategy = validated("validation.min_valid_replies=2")
    nan = {**update(), "b": np.full(2, np.nan, np.float32)}
    arrays, metrics = strategy.aggregate_train(1, [reply(1, update()), reply(2, nan)])
    assert arrays is None and metrics is None
    assert skipped_reason(strategy, 1) == ("only 1 valid update(s) of 2 replies, at least 2 "
                                           "needed")


def test_norm_ratio_rejects_a_scaled_update() -> None:
    strategy = validated("validation.max_norm_ratio=10")
    replies = [reply(n, update(1.0 + 0.1 * n)) for n in (1, 2, 3, 4)] + [reply(5, update(100.0))]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert [r["site"] for r in round_rejections(strategy, 1)] == ["site-4"]
    assert "times the round's median" in round_rejections(strategy, 1)[0]["reason"]
    assert float(arrays["w"].numpy().max()) < 2.0


def test_validation_can_be_switched_off_and_bad_settings_are_refused() -> None:
    cfg = compose_config("validation.enabled=false")
    assert find(strategies.build(cfg, 3), UpdateValidation) is None
    assert type(innermost(strategies.build(cfg, 3))) is FedAvg
    with pytest.raises(ValidationConfigError, match=r"validation\.max_update_norm must be"):
        strategies.build(compose_config("validation.max_update_norm=-1"), 3)


def test_central_dp_noise_is_calibrated_to_the_updates_that_passed() -> None:
    cfg = compose_config("partition.num_sites=5 privacy=central_dp")
    strategy = strategies.build(cfg, 5, node_sites=NODE_SITES, train_sizes=SIZES)
    dp = find(strategy, _RoundNoise)
    assert dp is not None and find(strategy, UpdateValidation) is not None
    list(strategy.configure_train(1, ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}),
                                  ConfigRecord({"cfg": to_json(cfg)}), Grid()))
    replies = []
    for node in NODE_SITES:
        arrays = update(0.01) if node < 4 else {**update(), "w": np.full((2, 3), np.nan,
                                                                          np.float32)}
        msg = reply(node, arrays)
        msg.content["metrics"]["dp-weight"] = 1
        msg.content["privacy"] = spend_record({"status": "trained", "mechanism": "central_dp"})
        replies.append(msg)
    arrays, _ = strategy.aggregate_train(1, replies)
    assert dp.num_sampled_clients == 3  # two NaN updates rejected before the average
    assert np.all(np.isfinite(arrays["w"].numpy()))


@pytest.mark.parametrize(("name", "cls"), [
    ("median", FedMedian), ("trimmed_mean", FedTrimmedAvg), ("krum", Krum),
    ("multikrum", MultiKrum), ("bulyan", Bulyan),
])
def test_robust_strategies_are_flowers_own(name: str, cls: type) -> None:
    sites = 7 if name == "bulyan" else 5
    strategy = strategies.build(compose_config(f"strategy={name}"), sites)
    assert type(innermost(strategy)) is cls
    needed = {"krum": 3 + 2, "multikrum": 3 + 2, "bulyan": 7}.get(name, 1)
    assert find(strategy, UpdateValidation).min_replies == needed


def test_median_aggregate_ignores_one_huge_update() -> None:
    strategy = validated("strategy=median")
    replies = [reply(n, update(float(n))) for n in (1, 2, 3, 4)] + [reply(5, update(1e6))]
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), np.full((2, 3), 3.0))


@pytest.mark.parametrize(("overrides", "sites", "message"), [
    ("strategy=krum", 4, "strategy=krum with num_malicious_nodes=1 needs at least 5 sites"),
    ("strategy=bulyan", 5, "strategy=bulyan with num_malicious_nodes=1 needs at least 7 sites"),
    ("strategy=trimmed_mean strategy.beta=0.5", 5, "strategy.beta must be in [0, 0.5)"),
    ("strategy=multikrum strategy.num_nodes_to_select=9", 5, "num_nodes_to_select must be"),
])
def test_robust_settings_that_cannot_work_are_refused(overrides: str, sites: int,
                                                      message: str) -> None:
    with pytest.raises(RobustConfigError, match=message.replace("[", r"\[").replace(")", r"\)")):
        strategies.build(compose_config(overrides), sites)


@pytest.mark.parametrize("name", ["median", "trimmed_mean", "krum"])
def test_central_dp_over_a_robust_aggregator_is_refused(name: str) -> None:
    cfg = compose_config(f"strategy={name} privacy=central_dp partition.num_sites=5")
    with pytest.raises(PrivacyConfigError, match="needs an averaging strategy") as err:
        strategies.build(cfg, 5, node_sites=NODE_SITES)
    assert "\n" not in str(err.value)


def test_robust_aggregation_composes_with_local_dp() -> None:
    cfg = compose_config("strategy=median privacy=local_dp partition.num_sites=5")
    strategy = strategies.build(cfg, 5, node_sites=NODE_SITES)
    assert type(innermost(strategy)) is FedMedian


# ----- fault injection -------------------------------------------------------------------------


def test_the_issue_example_composes_and_parses() -> None:
    cfg = compose_config("partition.num_sites=5 +faults.site-1=scale:100 +faults.site-3=nan")
    assert faults.configured(cfg) == {"site-1": faults.Fault("scale", 100.0),
                                      "site-3": faults.Fault("nan")}
    assert faults.check(cfg, dict.fromkeys(NODE_SITES.values(), True))


@pytest.mark.parametrize(("spec", "fault"), [
    ("inf", faults.Fault("inf")), (float("inf"), faults.Fault("inf")),
    ("wrong_shape", faults.Fault("wrong_shape")), ("label_flip", faults.Fault("label_flip")),
    ("crash:2", faults.Fault("crash", 2.0)), ("timeout:3", faults.Fault("timeout", 3.0)),
    ("scale:-0.5", faults.Fault("scale", -0.5)),
])
def test_every_fault_kind_parses(spec: object, fault: faults.Fault) -> None:
    assert faults.parse("site-0", spec) == fault


@pytest.mark.parametrize(("spec", "message"), [
    ("explode", "faults.site-0='explode' is not a fault"),
    ("scale", "scale needs a number"), ("crash:0", "the round must be a whole number"),
    ("crash:1.5", "the round must be a whole number"), ("nan:3", "nan takes no argument"),
])
def test_bad_faults_are_refused_in_one_line(spec: str, message: str) -> None:
    with pytest.raises(faults.FaultConfigError, match=message):
        faults.parse("site-0", spec)


def test_faults_are_refused_in_deployment_and_for_unknown_sites() -> None:
    cfg = compose_config("+faults.site-1=nan")
    with pytest.raises(faults.FaultConfigError, match=r"simulation only, and site\(s\) site-1"):
        faults.check(cfg, {"site-0": True, "site-1": False})
    with pytest.raises(faults.FaultConfigError, match=r"unknown site\(s\) site-1; the sites are"):
        faults.check(cfg, {"cleveland": True})
    msg = Message(RecordDict({"config": ConfigRecord({"cfg": to_json(cfg),
                                                      "server-round": 1})}),
                  dst_node_id=1, message_type=MessageType.TRAIN)
    deployed = Context(run_id=1, node_id=1, node_config={"data-path": "/x", "site-name": "a"},
                       state=RecordDict(), run_config={})
    with pytest.raises(faults.FaultConfigError, match="this SuperNode runs in deployment"):
        faults.fault_mod(msg, deployed, lambda m, c: m)


def test_reply_faults_corrupt_the_update_as_named() -> None:
    start = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    sent = ArrayRecord({k: Array(v) for k, v in update(0.5).items()})
    nan = faults.corrupt(faults.Fault("nan"), sent, start)
    assert all(np.isnan(nan[k].numpy().flat[0]) for k in GLOBAL)
    shaped = faults.corrupt(faults.Fault("wrong_shape"), sent, start)
    assert shaped["w"].numpy().shape == (2, 4) and shaped["b"].numpy().shape == (2,)
    scaled = faults.corrupt(faults.Fault("scale", 100.0), sent, start)
    np.testing.assert_allclose(scaled["w"].numpy(), np.full((2, 3), 50.0))
    assert reason(content({k: scaled[k].numpy() for k in GLOBAL}), max_update_norm=10) is not None


def test_fault_mod_crashes_and_corrupts_only_where_and_when_asked() -> None:
    cfg = compose_config("partition.num_sites=3 +faults.site-1=crash:2 +faults.site-2=nan")
    start = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})

    def ask(partition: int, server_round: int) -> Message:
        msg = Message(RecordDict({"arrays": start, "config": ConfigRecord(
            {"cfg": to_json(cfg), "server-round": server_round})}),
            dst_node_id=1, message_type=MessageType.TRAIN)
        context = Context(run_id=1, node_id=1, node_config={"partition-id": partition,
                                                            "num-partitions": 3},
                          state=RecordDict(), run_config={})
        honest = Message(content(update(0.5)), reply_to=msg)
        return faults.fault_mod(msg, context, lambda m, c: honest)

    assert np.isfinite(ask(1, 1).content["arrays"]["w"].numpy()).all()  # crash is for round 2
    with pytest.raises(faults.InjectedCrash, match="crash:2 at site-1"):
        ask(1, 2)
    assert np.isnan(ask(2, 1).content["arrays"]["w"].numpy().flat[0])
    np.testing.assert_array_equal(ask(0, 2).content["arrays"]["w"].numpy(), update(0.5)["w"])


def test_label_flip_trains_on_flipped_labels() -> None:
    data = TensorDataset(torch.zeros(4, 2), torch.tensor([0, 1, 1, 0]))
    cfg = compose_config("+faults.site-0=label_flip")
    flipped = faults.training_data(cfg, "site-0", data, num_classes=2)
    assert [int(flipped[i][1]) for i in range(4)] == [1, 0, 0, 1]
    assert faults.training_data(cfg, "site-1", data, num_classes=2) is data


def test_without_validation_the_same_faults_break_fedavg() -> None:
    """FedAvg alone: a NaN update poisons the average, a wrong shape crashes it."""
    plain = strategies.build(compose_config("validation.enabled=false"), 5)
    nan = {**update(), "w": np.full((2, 3), np.nan, np.float32)}
    arrays, _ = plain.aggregate_train(1, [reply(1, update()), reply(2, nan)])
    assert np.isnan(arrays["w"].numpy()).all()
    with pytest.raises(ValueError):
        plain.aggregate_train(1, [reply(1, update()), reply(2, {**update(), "w": np.zeros(
            (2, 4), np.float32)})])


@pytest.mark.parametrize("name", ["median", "trimmed_mean", "krum", "multikrum", "bulyan"])
def test_secure_aggregation_over_a_robust_aggregator_is_refused(name: str) -> None:
    cfg = compose_config(f"strategy={name} secagg=secaggplus partition.num_sites=7")
    with pytest.raises(SecureAggregationConfigError,
                       match=f"secagg=secaggplus cannot be combined with strategy={name}") as err:
        check_secure_aggregation(cfg)
    assert "\n" not in str(err.value)


def test_validation_is_off_under_secure_aggregation() -> None:
    # the server sees only the sum: no single update to check (robust aggregators: refused)
    cfg = compose_config("secagg=secaggplus partition.num_sites=5")
    strategy = strategies.build(cfg, 5, node_sites=NODE_SITES, train_sizes=SIZES)
    assert find(strategy, UpdateValidation) is None
    assert type(innermost(strategy)) is FedAvg
