"""Central DP through Flower's real wrappers: noise of the stated size, clipping, accounting.

Each "round" goes through the strategy the factory builds (PrivacyGuard -> Flower's
DifferentialPrivacy*Clipping wrapper -> FedAvg): ``configure_train`` samples the sites and
``aggregate_train`` clips (server-side) or receives updates clipped by Flower's client mod
(client-side), averages them and adds the noise. Four sites send known updates.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from opacus.accountants import RDPAccountant

import strategies
from fl_app.config import compose_config, to_json
from fl_app.privacy_ledger import find_guard
from strategies.budget import LEDGER_KEYS, PrivacyConfigError, spend_record
from strategies.central_dp import _RoundNoise, make_clipping_mod
from strategies.wrapper import find

NODE_SITES = {11: "site-0", 12: "site-1", 13: "site-2", 14: "site-3"}
DIM = 2000
DELTA = 1e-5


pytestmark = pytest.mark.usefixtures("task_identity")  # tests/conftest.py


class NodeGrid:
    """The one Grid call FedAvg's sampling makes: which SuperNodes are connected."""

    def get_node_ids(self) -> list[int]:
        return list(NODE_SITES)


def build(overrides: str, seed: int = 0):
    """The factory's strategy for 4 sites, with a seeded noise generator (for the statistics)."""
    cfg = compose_config(f"privacy=central_dp partition.num_sites=4 {overrides}")
    strategy = strategies.build(cfg, 4, node_sites=NODE_SITES)
    guard = find_guard(strategy)
    find(guard, _RoundNoise).rng = np.random.default_rng(seed)  # under update validation
    return cfg, guard


def reply_to(msg: Message, new_weights: np.ndarray) -> Message:
    """A site's train reply: its new model, metrics, name and privacy report."""
    node = msg.metadata.dst_node_id
    return Message(RecordDict({
        "arrays": ArrayRecord({"w": Array(new_weights)}),
        # the sites differ in size: central DP must still weight them equally
        "metrics": MetricRecord({"train_loss": 0.1, "num-examples": 10 * node, "dp-weight": 1}),
        "site": ConfigRecord({"name": NODE_SITES[node]}),
        "privacy": spend_record({"status": "trained", "mechanism": "central_dp"}),
    }), reply_to=msg)


def one_round(cfg, guard, server_round: int, current: np.ndarray, updates: dict[int, np.ndarray],
              via_mod: bool = False) -> tuple[np.ndarray, list[Message]]:
    """Configure, reply (optionally through Flower's client clipping mod), aggregate."""
    arrays = ArrayRecord({"w": Array(current)})
    config = ConfigRecord({"cfg": to_json(cfg)})
    messages = list(guard.configure_train(server_round, arrays, config, NodeGrid()))
    replies = []
    for msg in messages:
        new = current + updates[msg.metadata.dst_node_id]
        if via_mod:
            context = Context(run_id=1, node_id=msg.metadata.dst_node_id, node_config={},
                              state=RecordDict(), run_config={})
            mod = make_clipping_mod("cfg")
            replies.append(mod(msg, context, lambda m, _c, new=new: reply_to(m, new)))
        else:
            replies.append(reply_to(msg, new))
    aggregated, _ = guard.aggregate_train(server_round, replies)
    return aggregated["w"].numpy(), replies


def spy_on_clipped_updates(guard) -> list[list[float]]:
    """Record the norms of the updates FedAvg receives (after clipping) in every round."""
    base, seen = guard.base, []
    real = base.aggregate_train

    def spy(server_round, replies):
        replies = list(replies)
        current = guard.strategy.current_arrays["w"].numpy()
        seen.append([float(np.linalg.norm(r.content["arrays"]["w"].numpy() - current))
                     for r in replies])
        return real(server_round, replies)

    base.aggregate_train = spy
    return seen


def rdp_epsilon(noise: float, q: float, steps: int) -> float:
    acc = RDPAccountant()
    acc.history = [(noise, q, steps)]
    return acc.get_epsilon(delta=DELTA)


def test_server_side_noise_has_the_stated_stdev_over_many_draws():
    z, clip, rounds = 0.8, 0.5, 50
    cfg, guard = build(f"privacy.noise_multiplier={z} privacy.clipping_norm={clip}")
    rng = np.random.default_rng(1)
    current = rng.normal(size=DIM)
    u = rng.normal(size=DIM)
    u *= 2.0 / np.linalg.norm(u)  # norm 2 > clip: every update is clipped to norm 0.5
    expected = current + u * clip / 2.0
    seen = spy_on_clipped_updates(guard)
    residuals = []
    for r in range(1, rounds + 1):
        aggregated, _ = one_round(cfg, guard, r, current, dict.fromkeys(NODE_SITES, u))
        residuals.append(aggregated - expected)
    residuals = np.concatenate(residuals)  # 100,000 draws of the noise
    stated = z * clip / 4  # noise_multiplier x clipping_norm / sites averaged
    assert guard.strategy.last_noise_stdv == pytest.approx(stated)
    assert residuals.std() == pytest.approx(stated, rel=0.02)
    assert abs(residuals.mean()) < 4 * stated / np.sqrt(residuals.size)
    assert all(n == pytest.approx(clip) for norms in seen for n in norms)
    # accounting: one Gaussian release per round, every site in every round (q = 1)
    eps = guard.site_states["site-0"].epsilon()
    assert eps == pytest.approx(rdp_epsilon(z, 1.0, rounds), abs=1e-6)
    assert guard.central_state.epsilon() == pytest.approx(eps)
    lines = guard.pop_ledger()
    assert len(lines) == 4 * rounds
    assert all(set(LEDGER_KEYS) <= set(line) for line in lines)
    last = [line for line in lines if line["round"] == rounds]
    assert {(x["mechanism"], x["noise_multiplier"], x["clipping_norm"], x["sample_rate"],
             x["steps"], x["accountant"], x["status"]) for x in last} == {
        ("central_dp", z, clip, 1.0, 1, "rdp", "trained")}


def test_server_side_clipping_bounds_every_update_and_averages_sites_equally():
    z, clip = 0.5, 0.5
    cfg, guard = build(f"privacy.noise_multiplier={z} privacy.clipping_norm={clip}")
    rng = np.random.default_rng(2)
    current = rng.normal(size=DIM)
    updates, clipped = {}, []
    for node, norm in zip(NODE_SITES, (0.2, 0.5, 3.0, 40.0), strict=True):
        u = rng.normal(size=DIM)
        updates[node] = u * norm / np.linalg.norm(u)
        clipped.append(updates[node] * min(1.0, clip / norm))
    seen = spy_on_clipped_updates(guard)
    residuals = []
    for r in range(1, 11):
        aggregated, _ = one_round(cfg, guard, r, current, updates)
        residuals.append(aggregated - (current + np.mean(clipped, axis=0)))
    for norms in seen:
        assert max(norms) <= clip * (1 + 1e-9)
        assert sorted(norms) == pytest.approx([0.2, 0.5, clip, clip])  # any reply order
    # equal weights although the sites report 110..140 examples: the mean of the clipped
    # updates is what the noise is centred on
    residuals = np.concatenate(residuals)
    assert residuals.std() == pytest.approx(z * clip / 4, rel=0.03)
    assert abs(residuals.mean()) < 4 * (z * clip / 4) / np.sqrt(residuals.size)


def test_client_side_clipping_with_flowers_mod():
    z, clip = 1.0, 0.3
    cfg, guard = build(f"privacy=central_dp_client privacy.noise_multiplier={z} "
                       f"privacy.clipping_norm={clip}")
    rng = np.random.default_rng(3)
    current = rng.normal(size=DIM)
    u = rng.normal(size=DIM)
    u *= 5.0 / np.linalg.norm(u)
    residuals = []
    for r in range(1, 21):
        aggregated, replies = one_round(cfg, guard, r, current, dict.fromkeys(NODE_SITES, u),
                                        via_mod=True)
        for reply in replies:  # clipped at the site, before anything is sent
            sent = reply.content["arrays"]["w"].numpy() - current
            assert np.linalg.norm(sent) == pytest.approx(clip)
        residuals.append(aggregated - (current + u * clip / 5.0))
    residuals = np.concatenate(residuals)
    assert residuals.std() == pytest.approx(z * clip / 4, rel=0.03)


def test_clipping_mod_is_transparent_without_client_side_central_dp():
    cfg = compose_config("privacy=central_dp")  # server-side clipping: the site sends as is
    msg = Message(RecordDict({"arrays": ArrayRecord({"w": Array(np.zeros(3))}),
                              "config": ConfigRecord({"cfg": to_json(cfg)})}),
                  dst_node_id=11, message_type="train")
    big = np.full(3, 10.0)
    context = Context(run_id=1, node_id=11, node_config={}, state=RecordDict(), run_config={})
    out = make_clipping_mod("cfg")(msg, context, lambda m, _c: reply_to(m, big))
    np.testing.assert_array_equal(out.content["arrays"]["w"].numpy(), big)


def test_adaptive_noise_matches_this_rounds_norm_and_the_norm_tracks_the_updates():
    z, c0 = 1.0, 0.1
    cfg, guard = build(f"privacy=central_dp_adaptive privacy.clipping=server "
                       f"privacy.noise_multiplier={z} privacy.clipping_norm={c0}")
    wrapper = guard.strategy
    z_update = wrapper.noise_multiplier  # Flower's share for the update: > z
    assert z_update == pytest.approx((z**-2 - (2 * 1.0) ** -2) ** -0.5)
    rng = np.random.default_rng(4)
    current = rng.normal(size=DIM)
    u = rng.normal(size=DIM)
    u *= 5.0 / np.linalg.norm(u)  # far above the starting norm: every update is clipped
    norms, standardised = [], []
    for r in range(1, 21):
        norm = wrapper.clipping_norm
        norms.append(norm)
        aggregated, _ = one_round(cfg, guard, r, current, dict.fromkeys(NODE_SITES, u))
        assert wrapper.last_noise_stdv == pytest.approx(z_update * norm / 4)
        standardised.append((aggregated - (current + u * min(1.0, norm / 5.0)))
                            / (z_update * norm / 4))
    standardised = np.concatenate(standardised)
    assert standardised.std() == pytest.approx(1.0, rel=0.03)
    # every update clipped -> the norm must grow towards the update norms (median tracking)
    assert norms[-1] > 3 * norms[0]
    lines = [x for x in guard.pop_ledger() if x["site"] == "site-0"]
    assert [x["clipping_norm"] for x in lines] == pytest.approx(norms)
    assert {x["noise_multiplier"] for x in lines} == {z}  # the accounted multiplier
    assert lines[-1]["epsilon"] == pytest.approx(rdp_epsilon(z, 1.0, 20), abs=1e-6)


def test_site_sampling_is_accounted_as_poisson_with_the_sampled_fraction():
    z, rounds = 1.0, 6
    cfg, guard = build(f"privacy.noise_multiplier={z} strategy.fraction_train=0.5")
    current = np.zeros(DIM)
    updates = dict.fromkeys(NODE_SITES, np.full(DIM, 1e-3))
    for r in range(1, rounds + 1):
        one_round(cfg, guard, r, current, updates)
        lines = guard.pop_ledger()
        assert sorted(x["status"] for x in lines) == ["not_sampled", "not_sampled",
                                                      "trained", "trained"]
        assert {x["steps"] for x in lines} == {1} and {x["sample_rate"] for x in lines} == {0.5}
    for site in NODE_SITES.values():
        eps = guard.site_states[site].epsilon()
        assert eps == pytest.approx(rdp_epsilon(z, 0.5, rounds), abs=1e-6)
        assert eps < rdp_epsilon(z, 1.0, rounds)


def test_central_dp_refuses_a_non_averaging_aggregator():
    cfg = compose_config("privacy=central_dp strategy=fedadam partition.num_sites=4")
    with pytest.raises(PrivacyConfigError, match="averaging strategy"):
        strategies.build(cfg, 4, node_sites=NODE_SITES)
