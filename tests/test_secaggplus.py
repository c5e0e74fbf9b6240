"""SecAgg+ on the Message API with in-process hospitals (fast; real crypto, real messages).

The hospitals are simulated by ``benchmarks.local_grid.LocalGrid``: every message goes through
Flower's protobuf serialisation to the site's real ``secure_aggregation_mod``; each site's
update is known, so the secure aggregate can be compared with plain FedAvg's.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message

import strategies
from benchmarks.local_grid import LocalGrid, with_mods
from fl_app.config import compose_config
from strategies.secaggplus import MASKED_RECORD, SecAggPlus, unpack
from strategies.secure_aggregation import (
    REFUSALS,
    SecureAggregationConfigError,
    SecureAggregationFailure,
    check_secure_aggregation,
    secure_aggregation_mod,
)
from tests.secagg_sim import fake_train, site_examples, site_grid, site_update

pytestmark = pytest.mark.usefixtures("task_identity")  # tests/conftest.py

SIZE = 3000  # coordinates of the toy model


def _model() -> ArrayRecord:
    rng = np.random.default_rng(0)
    return ArrayRecord({
        "layer.weight": Array(rng.normal(0, 0.3, (50, 50)).astype(np.float32)),
        "layer.bias": Array(rng.normal(0, 0.3, 500).astype(np.float32)),
    })


def _bound(cfg) -> float:
    """The stated precision: 2 * clipping_range / quantization_range per coordinate."""
    return 2 * float(cfg.secagg.clipping_range) / int(cfg.secagg.quantization_range)


def _max_diff(a: ArrayRecord, b: ArrayRecord) -> float:
    return max(float(np.max(np.abs(a[k].numpy().astype(np.float64) - b[k].numpy())))
               for k in a)


def _round(strategy, grid, server_round: int, arrays: ArrayRecord):
    config = ConfigRecord()
    messages = list(strategy.configure_train(server_round, arrays, config, grid))
    replies = grid.send_and_receive(messages)
    return strategy.aggregate_train(server_round, replies)


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam"])
def test_secure_aggregate_equals_plain_aggregate_over_rounds(strategy: str) -> None:
    sites = 4
    cfg = compose_config(f"strategy={strategy} secagg=secaggplus")
    secure = strategies.build(cfg, sites)
    plain = strategies.build(compose_config(f"strategy={strategy}"), sites)
    assert isinstance(secure, SecAggPlus)
    grid = site_grid(sites, [secure_aggregation_mod])
    plain_grid = site_grid(sites, [secure_aggregation_mod])
    arrays = _model()
    # FedAdam's step divides by sqrt(v) + tau: a change e in the average moves it by at most
    # eta * (1 - beta_1) * e / tau (+ the same through v), i.e. ~2x here
    tolerance = _bound(cfg) * (1 if strategy == "fedavg" else 4) + 1e-6
    for server_round in (1, 2, 3):
        got, metrics = _round(secure, grid, server_round, arrays)
        want, want_metrics = _round(plain, plain_grid, server_round, arrays)
        assert got is not None and list(got.keys()) == list(want.keys())
        assert _max_diff(got, want) <= tolerance, (server_round, _max_diff(got, want))
        assert _max_diff(got, arrays) > 100 * tolerance  # the model did move
        assert dict(metrics) == pytest.approx(dict(want_metrics))  # metrics stay per site
        assert secure.aggregated_nodes == [1, 2, 3, 4]
        arrays = got


def test_weighted_average_matches_the_sites_updates() -> None:
    """Directly: the aggregate is global + sum_i n_i * update_i / sum_i n_i."""
    cfg = compose_config("secagg=secaggplus")
    secure = strategies.build(cfg, 3)
    grid = site_grid(3, [secure_aggregation_mod])
    arrays = _model()
    got, _ = _round(secure, grid, 1, arrays)
    n = np.array([site_examples(s) for s in (1, 2, 3)], np.float64)
    bias = np.stack([site_update(s, 1, 500) * 2 for s in (1, 2, 3)])  # 2nd key: x(1 + 1)
    want = arrays["layer.bias"].numpy() + (n[:, None] * bias).sum(0) / n.sum()
    assert np.max(np.abs(got["layer.bias"].numpy() - want)) <= _bound(cfg) + 1e-6


def test_server_holds_only_masked_vectors_and_the_sum() -> None:
    cfg = compose_config("secagg=secaggplus")
    secure = strategies.build(cfg, 4)
    grid = site_grid(4, [secure_aggregation_mod])
    arrays = _model()
    inner_seen: list[Message] = []
    original = secure.strategy.aggregate_train

    def spy(server_round, replies):
        replies = list(replies)
        inner_seen.extend(replies)
        return original(server_round, replies)

    secure.strategy.aggregate_train = spy
    got, _ = _round(secure, grid, 1, arrays)
    masked = [r for r in grid.seen_by_server if MASKED_RECORD in r.content.array_records]
    assert len(masked) == 4
    for reply in masked:
        # no model arrays travel, only the masked vector
        assert "arrays" not in reply.content.array_records
        node = reply.metadata.src_node_id
        vector = unpack(reply.content[MASKED_RECORD]["masked"].numpy(),
                        int(cfg.secagg.modulus_range)).astype(np.float64)[:-1]
        truth = np.concatenate([site_update(node, 1, 2500), site_update(node, 1, 500) * 2])
        corr = np.corrcoef(vector, truth)[0, 1]
        assert abs(corr) < 0.1, corr  # ~0: independent of the hospital's update
        weighted = truth * site_examples(node)
        assert abs(np.corrcoef(vector, weighted)[0, 1]) < 0.1
    # the inner strategy receives one array per site: all the same, the average
    assert len(inner_seen) == 4
    for reply in inner_seen:
        assert _max_diff(reply.content["arrays"], got) < 1e-6


def test_site_lost_after_share_stage_is_recovered() -> None:
    cfg = compose_config("secagg=secaggplus")
    secure = strategies.build(cfg, 5)
    grid = site_grid(5, [secure_aggregation_mod])
    grid.kill(3, after_messages=2)  # answered setup and share-keys, never trains
    arrays = _model()
    got, _ = _round(secure, grid, 1, arrays)
    assert secure.aggregated_nodes == [1, 2, 4, 5]
    plain = strategies.build(compose_config(""), 4)
    ref = site_grid(5, [])
    ref.kill(3, after_messages=0)
    want, _ = _round(plain, ref, 1, arrays)
    assert _max_diff(got, want) <= _bound(cfg) + 1e-6


def test_site_lost_after_sending_its_masked_update_is_still_summed() -> None:
    cfg = compose_config("secagg=secaggplus")
    secure = strategies.build(cfg, 5)
    grid = site_grid(5, [secure_aggregation_mod])
    grid.kill(2, after_messages=3)  # sends its masked update, gone at the unmask stage
    arrays = _model()
    got, _ = _round(secure, grid, 1, arrays)
    assert secure.aggregated_nodes == [1, 2, 3, 4, 5]
    want, _ = _round(strategies.build(compose_config(""), 5), site_grid(5, []), 1,
                     arrays)
    assert _max_diff(got, want) <= _bound(cfg) + 1e-6


@pytest.mark.parametrize("policy", ["stop", "continue"])
def test_too_many_sites_lost_fails_loudly(policy: str) -> None:
    cfg = compose_config(f"secagg=secaggplus on_site_failure={policy}")
    secure = strategies.build(cfg, 5)  # threshold: 3 of 5
    grid = site_grid(5, [secure_aggregation_mod])
    for node in (1, 2, 3):
        grid.kill(node, after_messages=2)
    if policy == "stop":
        with pytest.raises(SecureAggregationFailure, match="fewer than reconstruction_threshold=3"):
            _round(secure, grid, 1, _model())
    else:
        assert _round(secure, grid, 1, _model()) == (None, None)
        assert "fewer than reconstruction_threshold=3" in secure.failed_rounds[1]
        assert secure.aggregated_nodes == []


def test_secaggplus_ring_neighbourhood_with_shares_below_sites() -> None:
    """SecAgg+ proper: each hospital shares with 3 neighbours of 7; still the exact sum."""
    cfg = compose_config("secagg=secaggplus secagg.num_shares=3 secagg.reconstruction_threshold=2")
    secure = strategies.build(cfg, 7)
    grid = site_grid(7, [secure_aggregation_mod])
    grid.kill(5, after_messages=2)
    arrays = _model()
    got, _ = _round(secure, grid, 1, arrays)
    ref = site_grid(7, [])
    ref.kill(5, after_messages=0)
    want, _ = _round(strategies.build(compose_config(""), 6), ref, 1, arrays)
    assert _max_diff(got, want) <= _bound(cfg) + 1e-6


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ("privacy=central_dp", "privacy.clipping"),
        ("privacy=central_dp privacy.clipping=server", "privacy.clipping"),
    ],
)
def test_combinations_needing_single_updates_are_refused(overrides: str, key: str) -> None:
    cfg = compose_config(f"secagg=secaggplus {overrides}")
    with pytest.raises(SecureAggregationConfigError, match=key) as err:
        check_secure_aggregation(cfg)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["median", "krum", "multikrum", "trimmed_mean", "bulyan"])
def test_single_update_strategies_and_contribution_scores_are_refused(name: str) -> None:
    from omegaconf import OmegaConf, open_dict

    cfg = compose_config("secagg=secaggplus")
    with open_dict(cfg):
        cfg.strategy.name = name
    with pytest.raises(SecureAggregationConfigError, match=f"strategy={name}"):
        check_secure_aggregation(cfg)
    cfg = compose_config("secagg=secaggplus")
    with open_dict(cfg):
        cfg.contribution = OmegaConf.create({"name": "shapley"})
    with pytest.raises(SecureAggregationConfigError, match="contribution"):
        check_secure_aggregation(cfg)
    assert {r.key for r in REFUSALS} >= {"privacy.clipping", "strategy", "contribution"}


def test_allowed_combinations_and_bad_parameters() -> None:
    for ok in ("", "privacy=central_dp_client", "privacy=local_dp", "strategy=fedadam",
               "strategy=fedprox fedbn=true", "privacy=central_dp_adaptive"):
        assert check_secure_aggregation(compose_config(f"secagg=secaggplus {ok}")) == "secaggplus"
    assert check_secure_aggregation(compose_config("privacy=central_dp")) == "none"
    for bad, key in (("secagg.modulus_range=1000", "modulus_range"),
                     ("secagg.num_shares=2", "num_shares"),
                     ("secagg.clipping_range=-1.0", "clipping_range"),
                     ("secagg.num_shares=3 secagg.reconstruction_threshold=4",
                      "reconstruction_threshold")):
        with pytest.raises(SecureAggregationConfigError, match=key):
            check_secure_aggregation(compose_config(f"secagg=secaggplus {bad}"))


def test_a_site_protecting_another_weight_than_it_reports_is_caught() -> None:
    def understate(msg, context, call_next):  # site 2 reports fewer examples than it summed
        reply = call_next(msg, context)
        if context.node_id == 2 and "metrics" in reply.content:
            reply.content["metrics"]["num-examples"] = 1
        return reply

    secure = strategies.build(compose_config("secagg=secaggplus on_site_failure=stop"), 3)
    grid = site_grid(3, [understate, secure_aggregation_mod])
    with pytest.raises(SecureAggregationFailure, match="summed weight"):
        _round(secure, grid, 1, _model())


def test_a_privacy_budget_refusal_is_left_out_of_the_sum() -> None:
    """A site that may not train (budget spent) returns the global model: it is a dropout,
    not a zero update diluting the others' average."""
    from strategies.budget import STATUS_EXHAUSTED, spend_record

    def refuse_at_site_2(msg, context):
        reply = fake_train(msg, context)
        if context.node_id == 2:
            reply.content["arrays"] = msg.content["arrays"]
            reply.content["privacy"] = spend_record({"status": STATUS_EXHAUSTED})
        return reply

    cfg = compose_config("secagg=secaggplus")
    secure = strategies.build(cfg, 4)
    grid = LocalGrid(4, with_mods([secure_aggregation_mod], refuse_at_site_2))
    arrays = _model()
    inner: list[Message] = []
    original = secure.strategy.aggregate_train

    def drop_refusal(server_round, replies):  # what the privacy guard does with it
        inner.extend(replies)
        return original(server_round, [r for r in replies if r.metadata.src_node_id != 2])

    secure.strategy.aggregate_train = drop_refusal
    got, _ = _round(secure, grid, 1, arrays)
    assert secure.aggregated_nodes == [1, 3, 4]
    assert "arrays" not in next(r for r in inner if r.metadata.src_node_id == 2).content
    ref = site_grid(4, [])
    ref.kill(2, after_messages=0)
    want, _ = _round(strategies.build(compose_config(""), 3), ref, 1, arrays)
    assert _max_diff(got, want) <= _bound(cfg) + 1e-6


def test_fedbn_site_local_layers_are_not_in_the_sum() -> None:
    """With fedbn=true the sites keep their normalisation layers (fedbn_mod takes them out of
    the reply, inside the secure-aggregation mod): the masked vector has only the shared keys,
    and the aggregate keeps the global normalisation entries."""

    def keep_bias_local(msg, context, call_next):  # what fedbn_mod does to the reply
        reply = call_next(msg, context)
        arrays = reply.content["arrays"]
        reply.content["arrays"] = ArrayRecord({k: arrays[k] for k in arrays if k != "layer.bias"})
        return reply

    cfg = compose_config("secagg=secaggplus fedbn=true")
    secure = strategies.build(cfg, 3)
    grid = site_grid(3, [secure_aggregation_mod, keep_bias_local])
    arrays = _model()
    got, _ = _round(secure, grid, 1, arrays)
    assert list(got.keys()) == list(arrays.keys())
    assert np.array_equal(got["layer.bias"].numpy(), arrays["layer.bias"].numpy())
    masked = [r for r in grid.seen_by_server if MASKED_RECORD in r.content.array_records]
    assert all(list(r.content["secagg"]["keys"]) == ["layer.weight"] for r in masked)
    want, _ = _round(strategies.build(compose_config("fedbn=true"), 3),
                     site_grid(3, [keep_bias_local]), 1, arrays)
    assert _max_diff(got, want) <= _bound(cfg) + 1e-6


def test_central_dp_client_side_clipping_before_masking_noise_once() -> None:
    """privacy=central_dp_client: each site clips (Flower's fixedclipping_mod, inside the
    secure-aggregation mod) before masking; the DP wrapper adds noise once, to the unmasked
    average, calibrated to the m sites in the sum; the result equals plain central DP's."""
    from flwr.clientapp.mod import fixedclipping_mod

    from strategies.budget import STATUS_TRAINED, spend_record

    def report(msg, context, call_next):  # the central-DP report a site's handler adds
        reply = call_next(msg, context)
        reply.content["privacy"] = spend_record({"status": STATUS_TRAINED})
        return reply

    dp = "privacy=central_dp_client privacy.noise_multiplier=1e-9"
    cfg = compose_config(f"{dp} secagg=secaggplus")
    secure = strategies.build(cfg, 4)
    grid = site_grid(4, [secure_aggregation_mod, report, fixedclipping_mod])
    arrays = _model()
    got, _ = _round(secure, grid, 1, arrays)
    plain = strategies.build(compose_config(dp), 4)
    want, _ = _round(plain, site_grid(4, [report, fixedclipping_mod]), 1, arrays)
    assert _max_diff(got, want) <= _bound(cfg) + 1e-6
    # the updates were clipped to C = 1 (they are much longer): the mean moved by <= 1
    moved = np.sqrt(sum(np.sum((got[k].numpy() - arrays[k].numpy()) ** 2.0) for k in arrays))
    assert 0.1 < moved <= 1.0 + 1e-3
    wrapper = secure.strategy.strategy  # SecAgg -> PrivacyGuard -> Flower's DP wrapper
    assert wrapper.num_sampled_clients == 4
    assert wrapper.last_noise_stdv == pytest.approx(1e-9 * 1.0 / 4)
