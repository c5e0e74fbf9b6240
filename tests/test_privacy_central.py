"""Central DP through Flower's real wrappers: noise of the stated size, clipping, accounting.

Each "round" goes through the strategy the factory builds (PrivacyGuard -> Flower's
DifferentialPrivacy*Clipping wrapper -> FedAvg): ``configure_train`` samples the sites and
``aggregate_train`` clips (server-side) or receives updates clipped by Flower's client mod
(client-side), averages them and adds the noise. Four sites send known updates.
"""

from __future__ import annotations

import math
import random

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
from flwr.serverapp.strategy import FedAvg
from opacus.accountants import RDPAccountant

import strategies
from fl_app.config import compose_config, to_json
from fl_app.experiment import seed_everything
from fl_app.privacy_ledger import find_guard
from strategies.budget import LEDGER_KEYS, PrivacyConfigError, spend_record
from strategies.central_dp import (
    _RoundNoise,
    accounted_noise_multiplier,
    build_central_dp,
    make_clipping_mod,
)
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
        current = guard._round_arrays["w"].numpy()
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


def sampled_sites(guard, rounds: int) -> list[tuple[str, ...]]:
    """Which sites the guard asks to train in each of ``rounds`` rounds."""
    out = []
    for r in range(1, rounds + 1):
        arrays = ArrayRecord({"w": Array(np.zeros(3))})
        messages = guard.configure_train(r, arrays, ConfigRecord({}), NodeGrid())
        out.append(tuple(sorted(NODE_SITES[m.metadata.dst_node_id] for m in messages)))
    return out


def test_two_runs_with_the_same_public_seed_sample_different_sites():
    samples = []
    for _ in range(2):  # the experiment seeds Python, NumPy and torch with cfg.seed
        seed_everything(42)
        _, guard = build("privacy.noise_multiplier=1.0 strategy.fraction_train=0.5")
        samples.append(sampled_sites(guard, 12))
    assert all(len(s) == 2 for s in samples[0] + samples[1])
    # 6 possible pairs per round: equal sequences over 12 rounds have probability 6^-12
    assert samples[0] != samples[1]
    # Flower's own sampler, seeded the same way, repeats itself exactly (what we replace)
    flower = []
    for _ in range(2):
        seed_everything(42)
        flower.append([tuple(sorted(random.sample(list(NODE_SITES), 2))) for _ in range(12)])
    assert flower[0] == flower[1]


def test_a_published_sample_is_accounted_without_amplification():
    z, rounds = 1.0, 6
    cfg, guard = build(f"privacy.noise_multiplier={z} strategy.fraction_train=0.5")
    current = np.zeros(DIM)
    updates = dict.fromkeys(NODE_SITES, np.full(DIM, 1e-3))
    trained = dict.fromkeys(NODE_SITES.values(), 0)
    for r in range(1, rounds + 1):
        one_round(cfg, guard, r, current, updates)
        lines = guard.pop_ledger()
        assert sorted(x["status"] for x in lines) == ["not_sampled", "not_sampled",
                                                      "trained", "trained"]
        assert {x["sample_rate"] for x in lines} == {1.0}  # q = 1: no amplification claimed
        for x in lines:
            assert x["steps"] == (x["status"] == "trained")  # a site not sampled spends nothing
            trained[x["site"]] += x["status"] == "trained"
            assert x["epsilon"] == pytest.approx(
                rdp_epsilon(z, 1.0, trained[x["site"]]) if trained[x["site"]] else 0.0,
                abs=1e-6)
    assert sum(trained.values()) == 2 * rounds
    assert guard.central_state.epsilon() == pytest.approx(rdp_epsilon(z, 1.0, rounds), abs=1e-6)


def test_a_secret_sample_is_accounted_as_poisson_and_not_published():
    z, rounds = 1.0, 6
    cfg, guard = build(f"privacy.noise_multiplier={z} strategy.fraction_train=0.5 "
                       "privacy.secret_sample=true")
    current = np.zeros(DIM)
    updates = dict.fromkeys(NODE_SITES, np.full(DIM, 1e-3))
    for r in range(1, rounds + 1):
        one_round(cfg, guard, r, current, updates)
        lines = guard.pop_ledger()
        assert {x["status"] for x in lines} == {"in_round"}  # who was sampled is not written
        assert {x["steps"] for x in lines} == {1} and {x["sample_rate"] for x in lines} == {0.5}
    for site in NODE_SITES.values():
        eps = guard.site_states[site].epsilon()
        assert eps == pytest.approx(rdp_epsilon(z, 0.5, rounds), abs=1e-6)
        assert eps < rdp_epsilon(z, 1.0, rounds)


def test_a_forged_dp_weight_cannot_change_the_aggregate():
    """A site reporting dp-weight -2.99 would blow an honest unit update up 100-fold."""
    z, clip = 0.0001, 1.0  # almost no noise: the aggregate is the mean of clipped updates
    cfg, guard = build(f"privacy.noise_multiplier={z} privacy.clipping_norm={clip}")
    current = np.zeros(DIM)
    honest = np.zeros(DIM)
    honest[0] = 1.0
    updates = {11: honest, 12: np.zeros(DIM), 13: np.zeros(DIM), 14: np.zeros(DIM)}
    arrays = ArrayRecord({"w": Array(current)})
    messages = list(guard.configure_train(1, arrays, ConfigRecord({"cfg": to_json(cfg)}),
                                          NodeGrid()))
    replies = [reply_to(m, current + updates[m.metadata.dst_node_id]) for m in messages]
    weights = {11: 1.0, 12: -2.99, 13: 1.0, 14: 1.0}
    for reply in replies:
        reply.content["metrics"]["dp-weight"] = weights[reply.metadata.src_node_id]
    aggregated, _ = guard.aggregate_train(1, replies)
    w = aggregated["w"].numpy()
    assert w[0] == pytest.approx(0.25, abs=1e-3)  # 1/m of the honest clipped update
    assert np.abs(w[1:]).max() < 1e-3


def test_client_side_update_above_the_clipping_norm_is_rejected():
    cfg, guard = build("privacy=central_dp_client privacy.noise_multiplier=1.0 "
                       "privacy.clipping_norm=0.5")
    rng = np.random.default_rng(5)
    current = rng.normal(size=DIM)
    good = rng.normal(size=DIM)
    good *= 0.5 / np.linalg.norm(good)  # exactly at the norm: accepted
    updates = dict.fromkeys(NODE_SITES, good)
    updates[13] = good * 8  # a site that skipped clipping
    seen = spy_on_clipped_updates(guard)
    one_round(cfg, guard, 1, current, updates)
    lines = {x["site"]: x for x in guard.pop_ledger()}
    assert lines["site-2"]["status"] == "rejected"
    assert "above the clipping norm 0.5" in lines["site-2"]["reason"]
    assert [x["status"] for s, x in sorted(lines.items()) if s != "site-2"] == ["trained"] * 3
    assert len(seen[0]) == 3 and max(seen[0]) == pytest.approx(0.5)
    assert "site-2" not in guard.eligible()  # not asked again


@pytest.mark.parametrize("preset", ["central_dp", "central_dp_client", "central_dp_adaptive"])
@pytest.mark.parametrize("clipping", ["server", "client"])
def test_an_all_zero_update_goes_through_every_clipping_path(preset, clipping):
    cfg, guard = build(f"privacy={preset} privacy.clipping={clipping} "
                       "privacy.noise_multiplier=0.5 privacy.clipped_count_stddev=1.0")
    current = np.ones(DIM)
    updates = dict.fromkeys(NODE_SITES, np.zeros(DIM))
    updates[11] = np.full(DIM, 1e-3)
    aggregated, replies = one_round(cfg, guard, 1, current, updates,
                                    via_mod=clipping == "client")
    assert np.isfinite(aggregated).all()
    assert [x["status"] for x in guard.pop_ledger()] == ["trained"] * 4
    if clipping == "client" and "adaptive" in preset:  # a zero update is not clipped
        bits = {r.metadata.src_node_id: r.content["metrics"]["norm_bit"] for r in replies}
        assert bits[12] == bits[13] == bits[14] == 0


# Opacus's default RDP orders, written out here so the check below shares no code with it
ALPHAS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


def independent_rdp_epsilon(gaussians: list[tuple[float, float]], releases: int,
                            delta: float) -> float:
    """Epsilon of ``releases`` rounds, each a set of Gaussian releases (sensitivity, sigma).

    RDP of a Gaussian mechanism at order a is a * s^2 / (2 sigma^2); orders add up over
    releases and rounds; converted to (epsilon, delta) with Balle et al. 2020 (Thm. 21).
    """
    best = math.inf
    for a in ALPHAS:
        rdp = releases * sum(a * s * s / (2 * sigma * sigma) for s, sigma in gaussians)
        eps = rdp + math.log1p(-1 / a) - (math.log(delta) + math.log(a)) / (a - 1)
        best = min(best, eps)
    return best


def test_adaptive_clipping_epsilon_equals_an_independent_rdp_computation():
    """Andrew et al. 2021's setting: m sites per round, sigma_b = m / 20, z = 1, q = 1."""
    m, z, rounds = 100, 1.0, 50
    cfg = compose_config(f"privacy=central_dp_adaptive privacy.noise_multiplier={z} "
                         f"privacy.clipped_count_stddev={m / 20} partition.num_sites={m}")
    wrapper = build_central_dp(FedAvg(weighted_by_key="dp-weight"), cfg, m,
                               rng=np.random.default_rng(6))
    sigma_b, z_update = wrapper.clipped_count_stddev, wrapper.noise_multiplier
    assert sigma_b == m / 20 and z_update > z
    # the count as released: sum of +-1/2 bits plus N(0, sigma_b^2), over the fixed m
    draws = np.array([1 - wrapper._noisy_fraction(30, 90) for _ in range(20000)])
    assert draws.mean() == pytest.approx(0.5 + (60 - 45) / m, abs=4 * sigma_b / m / 141)
    assert draws.std() == pytest.approx(sigma_b / m, rel=0.03)
    # one more site moves the noiseless count by exactly 1/2 (over m), clipped or not
    wrapper.clipped_count_stddev = 0.0
    base = 1 - wrapper._noisy_fraction(30, 90)
    assert 1 - wrapper._noisy_fraction(31, 91) == pytest.approx(base - 0.5 / m)
    assert 1 - wrapper._noisy_fraction(30, 91) == pytest.approx(base + 0.5 / m)
    # per round: the update (sensitivity C, noise z_update C) and the count (1/2, sigma_b)
    independent = independent_rdp_epsilon([(1.0, z_update), (0.5, sigma_b)], rounds, DELTA)
    accounted = rdp_epsilon(accounted_noise_multiplier(cfg), 1.0, rounds)
    assert accounted == pytest.approx(independent, rel=1e-9)
    # what Flower's raw 0/1 count over the actual number of replies gives (issue 14): more
    flower = independent_rdp_epsilon([(1.0, z_update), (1.0, sigma_b)], rounds, DELTA)
    assert flower > independent


def test_central_dp_refuses_a_non_averaging_aggregator():
    cfg = compose_config("privacy=central_dp strategy=fedadam partition.num_sites=4")
    with pytest.raises(PrivacyConfigError, match="averaging strategy"):
        strategies.build(cfg, 4, node_sites=NODE_SITES)
