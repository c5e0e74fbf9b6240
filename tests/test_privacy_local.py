"""Local DP-SGD through the real ClientApp on real heart-disease data, checked against Opacus.

Every round goes through ``fl_app.client_app.app`` (its mods included) with one persistent
``Context``, exactly as a SuperNode runs it; the epsilon a site reports is compared with an
Opacus accountant run directly on the same (noise multiplier, sample rate, steps) history.
"""

from __future__ import annotations

import itertools
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp.strategy import FedAvg
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from torch.utils.data import Subset

from fl_app.client_app import app as client_app
from fl_app.config import compose_config, to_json
from strategies.budget import (
    PrivacyConfigError,
    PrivacyStop,
    check_privacy_config,
    read_spend,
    spend_record,
)
from strategies.privacy import wrap_strategy
from strategies.site_privacy import PrivacyRefused, SitePrivacy
from tasks import SiteRef, engine, get_task
from tasks.federated_stats import combine_moments

DELTA = 1e-5


pytestmark = pytest.mark.usefixtures("task_identity")  # tests/conftest.py


def heart_cfg(shared_data: Path, overrides: str):
    return compose_config(
        f"task=heart_disease task.data_dir={shared_data / 'heart_disease'} privacy=local_dp "
        + overrides
    )


def federated_stats(cfg) -> dict:
    """The global feature statistics the server would combine from the four hospitals
    (``mean`` has one entry per feature)."""
    task = get_task("heart_disease")
    names = task.site_names(cfg)
    sites = [task.load_site(cfg, SiteRef(n, index=i)) for i, n in enumerate(names)]
    return combine_moments([task.local_statistics(s) for s in sites])


class Site:
    """One hospital's SuperNode: the real ClientApp and a Context that persists across rounds.

    Its privacy ledger lives in its own fresh state folder (``state-dir``) unless given one.
    """

    def __init__(self, cfg, index: int, node_config: dict | None = None, run_id: int = 1) -> None:
        self.cfg = cfg
        self.stats = json.dumps(federated_stats(cfg))
        node_config = {"partition-id": index, **(node_config or {})}
        node_config.setdefault("state-dir", tempfile.mkdtemp(prefix="fedclinic-site-"))
        self.context = Context(run_id=run_id, node_id=index + 1, node_config=node_config,
                               state=RecordDict(), run_config={})
        task = get_task("heart_disease")
        info = {"num_features": len(json.loads(self.stats)["mean"]), "num_classes": 2}
        torch.manual_seed(0)
        self.arrays = ArrayRecord(task.build_model(cfg, info).state_dict())

    def train_round(self, server_round: int) -> tuple[dict, Message]:
        config = ConfigRecord({"cfg": to_json(self.cfg), "stats": self.stats,
                               "server-round": server_round})
        msg = Message(RecordDict({"arrays": self.arrays, "config": config}),
                      dst_node_id=self.context.node_id, message_type=MessageType.TRAIN)
        reply = client_app(msg, self.context)
        assert not reply.has_error(), reply.error
        self.arrays = reply.content["arrays"]
        return read_spend(reply.content), reply


def opacus_epsilon(history: list[tuple[float, float, int]], accountant: str = "rdp") -> float:
    acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    acc.history = list(history)
    return acc.get_epsilon(delta=DELTA)


def test_epsilon_after_1_3_10_rounds_equals_opacus_on_the_same_history(shared_data):
    cfg = heart_cfg(shared_data, "privacy.noise_multiplier=1.2 privacy.target_epsilon=null "
                    "num_rounds=10 task.local_epochs=2")
    site = Site(cfg, index=0)  # Cleveland
    epsilons, history = [], []
    for server_round in range(1, 11):
        spend, reply = site.train_round(server_round)
        assert spend["status"] == "trained" and spend["mechanism"] == "local_dp"
        # 199 training patients, batch 16: 13 Poisson batches per epoch, 2 epochs per round
        assert spend["sample_rate"] == pytest.approx(1 / 13)
        assert spend["steps"] == 2 * 13
        assert spend["noise_multiplier"] == 1.2 and spend["clipping_norm"] == 1.0
        history.append((spend["noise_multiplier"], spend["sample_rate"], spend["steps"]))
        direct = opacus_epsilon([(1.2, 1 / 13, sum(h[2] for h in history))])
        per_round = opacus_epsilon(history)  # the same history, one entry per round
        assert spend["epsilon"] == pytest.approx(direct, abs=1e-6)
        assert spend["epsilon"] == pytest.approx(per_round, abs=1e-6)
        epsilons.append(spend["epsilon"])
        # Opacus's _module. prefix never reaches the server
        keys = list(reply.content["arrays"].keys())
        assert keys == ["0.weight", "0.bias"]
    assert all(b > a for a, b in itertools.pairwise(epsilons))
    print("epsilon after rounds 1, 3, 10:", epsilons[0], epsilons[2], epsilons[9])


def test_prv_accountant_is_selectable_and_matches_opacus(shared_data):
    cfg = heart_cfg(shared_data, "privacy.accountant=prv privacy.noise_multiplier=1.2 "
                    "privacy.target_epsilon=null num_rounds=3")
    site = Site(cfg, index=3)  # VA Long Beach: 84 patients, 6 batches per epoch
    for server_round in (1, 2):
        spend, _ = site.train_round(server_round)
        assert spend["accountant"] == "prv"
        direct = opacus_epsilon([(1.2, 1 / 6, 30 * server_round)], accountant="prv")
        assert spend["epsilon"] == pytest.approx(direct, abs=1e-6)
    rdp = opacus_epsilon([(1.2, 1 / 6, 60)])
    assert spend["epsilon"] < rdp  # PRV is the tighter accountant


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_calibrated_noise_reaches_the_target_over_the_planned_run(shared_data, accountant):
    rounds = 3
    cfg = heart_cfg(shared_data, f"privacy.target_epsilon=1.0 privacy.accountant={accountant} "
                    f"num_rounds={rounds}")
    site = Site(cfg, index=1)  # Hungary: 172 patients, 11 batches per epoch
    spends = [site.train_round(r)[0] for r in range(1, rounds + 1)]
    sigma = spends[0]["noise_multiplier"]
    assert all(s["noise_multiplier"] == sigma for s in spends)  # calibrated once, for the run
    expected = get_noise_multiplier(target_epsilon=1.0, target_delta=DELTA, sample_rate=1 / 11,
                                    steps=rounds * 5 * 11, accountant=accountant,
                                    epsilon_tolerance=0.01)
    assert sigma == pytest.approx(expected)
    final = spends[-1]["epsilon"]
    assert final <= 1.0  # never exceeded at the end of the planned run
    assert final > 0.97  # and the noise is not wastefully large
    assert spends[0]["epsilon"] < spends[1]["epsilon"] < final


def test_site_stops_on_the_predicted_round_and_says_why(shared_data):
    sigma, q, steps = 1.5, 1 / 13, 65
    eps2 = opacus_epsilon([(sigma, q, 2 * steps)])
    eps3 = opacus_epsilon([(sigma, q, 3 * steps)])
    budget = (eps2 + eps3) / 2  # rounds 1-2 fit, round 3 would not
    cfg = heart_cfg(shared_data, f"privacy.noise_multiplier={sigma} privacy.target_epsilon=null "
                    f"privacy.budget.epsilon={budget} num_rounds=5")
    site = Site(cfg, index=0)
    assert site.train_round(1)[0]["status"] == "trained"
    spend2, _ = site.train_round(2)
    before = site.arrays
    spend3, reply3 = site.train_round(3)
    assert spend2["status"] == "trained" and spend2["epsilon"] == pytest.approx(eps2, abs=1e-6)
    assert spend3["status"] == "budget_exhausted"
    assert spend3["steps"] == 0 and spend3["epsilon"] == pytest.approx(eps2, abs=1e-6)
    assert "would bring epsilon to" in spend3["reason"] and f"{eps3:.4f}" in spend3["reason"]
    # no training: the global model goes back unchanged
    for key in before:
        np.testing.assert_array_equal(reply3.content["arrays"][key].numpy(), before[key].numpy())


def test_a_hospital_can_cap_its_own_budget_in_node_config(shared_data):
    cfg = heart_cfg(shared_data, "privacy.noise_multiplier=1.5 privacy.target_epsilon=null "
                    "privacy.budget.epsilon=100.0 num_rounds=5")
    site = Site(cfg, index=0, node_config={"privacy-epsilon-budget": 1.0})
    spend, _ = site.train_round(1)  # one round costs 2.44 > 1.0: refused at once
    assert spend["status"] == "budget_exhausted" and spend["budget_epsilon"] == 1.0


def test_empty_poisson_batches_are_noise_only_steps(shared_data, tmp_path):
    """Three patients, batch size 1: a third of Poisson batches are empty; each is a step."""
    cfg = heart_cfg(shared_data, "privacy.noise_multiplier=1.0 privacy.target_epsilon=null "
                    "task.local_epochs=20 task.batch_size=1 num_rounds=1")
    task = get_task("heart_disease")
    site = task.apply_statistics(task.load_site(cfg, SiteRef("cleveland", index=0)),
                                 federated_stats(cfg))
    loader = engine.make_loader(Subset(site.train, [0, 1, 2]), 1, shuffle=True, seed=0)
    context = Context(run_id=1, node_id=1, node_config={"state-dir": str(tmp_path)},
                      state=RecordDict(), run_config={})
    privacy = SitePrivacy(cfg, "cleveland", context, loader)
    model = task.build_model(cfg, site.info)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model, optimizer, dp_loader = privacy.private(model, optimizer, loader)
    # P(no empty batch in 20 passes of 3) = (1 - (2/3)^3)^60 < 1e-9: not flaky
    empty = sum(len(y) == 0 for _ in range(20) for _, y in dp_loader)
    result = engine.train(model, dp_loader, epochs=20, optimizer=optimizer,
                          device=torch.device("cpu"), step_on_empty=privacy.step_on_empty)
    spend = read_spend(RecordDict(privacy.records(ConfigRecord({"server-round": 1}))))
    assert empty > 0  # (2/3)^3 per batch: about 18 of 60 are empty
    assert spend["steps"] == 60  # 20 epochs x 3 batches: empty ones counted too
    assert spend["epsilon"] == pytest.approx(opacus_epsilon([(1.0, 1 / 3, 60)]), abs=1e-6)
    assert result["examples_seen"] > 0
    assert all(torch.isfinite(v).all() for v in privacy.state_dict(model).values())


def test_noise_is_fresh_each_round_and_never_seeded_by_the_config(shared_data):
    cfg = heart_cfg(shared_data, "privacy.noise_multiplier=1.0 privacy.target_epsilon=null "
                    "num_rounds=2")
    results = []
    for _ in range(2):  # same config, same seed, same data: DP noise must differ
        results.append(Site(cfg, index=2).train_round(1)[1].content["arrays"]["0.weight"].numpy())
    assert not np.allclose(results[0], results[1])


def test_bad_privacy_settings_name_the_key(shared_data):
    with pytest.raises(PrivacyConfigError, match="target_epsilon"):
        check_privacy_config(heart_cfg(shared_data, "privacy.noise_multiplier=1.0"))
    with pytest.raises(PrivacyConfigError, match=r"privacy\.accountant"):
        check_privacy_config(heart_cfg(shared_data, "privacy.accountant=gdp"))
    with pytest.raises(PrivacyConfigError, match=r"privacy\.target_epsilon"):
        check_privacy_config(heart_cfg(shared_data, "privacy.target_epsilon=-1.0"))
    with pytest.raises(PrivacyConfigError, match=r"privacy\.max_grad_norm"):
        check_privacy_config(heart_cfg(shared_data, "privacy.max_grad_norm=-1.0"))
    with pytest.raises(PrivacyConfigError, match="proximal_mu"):
        wrap_strategy(None, heart_cfg(shared_data, "strategy=fedprox"), 4)  # type: ignore[arg-type]
    with pytest.raises(PrivacyConfigError, match="min_sites"):
        wrap_strategy(None, heart_cfg(shared_data, "privacy.budget.min_sites=5"), 4)  # type: ignore[arg-type]


def test_without_privacy_the_site_trains_as_before(shared_data):
    cfg = compose_config(f"task=heart_disease task.data_dir={shared_data / 'heart_disease'} "
                         "num_rounds=2")
    site = Site(cfg, index=0)
    spend, reply = site.train_round(1)
    assert spend is None and "privacy" not in reply.content  # no report, no DP, no refusal
    assert "dp-weight" not in reply.content["metrics"]


def ledger_lines(site: Site) -> list[dict]:
    folder = Path(site.context.node_config["state-dir"]) / "privacy_ledger"
    (path,) = folder.glob("*.jsonl")
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_epsilon_keeps_composing_with_a_fresh_context_mid_run_and_the_cap_binds(shared_data):
    """Issue 14's reproduction: target epsilon 1 over 4 rounds, node cap 0.8, a SuperNode that
    loses its memory (fresh Context) after round 2. Round 3 (epsilon 0.867) must be refused."""
    cfg = heart_cfg(shared_data, "privacy.target_epsilon=1.0 num_rounds=4")
    site = Site(cfg, index=0, node_config={"privacy-epsilon-budget": 0.8})
    first = [site.train_round(r)[0] for r in (1, 2)]
    sigma, q, steps = first[0]["noise_multiplier"], first[0]["sample_rate"], first[0]["steps"]
    expected = [opacus_epsilon([(sigma, q, steps * r)]) for r in (1, 2, 3)]
    assert [s["epsilon"] for s in first] == pytest.approx(expected[:2], abs=1e-6)
    assert expected[1] <= 0.8 < expected[2]
    # the SuperNode restarts: same hospital, same state folder, empty memory
    restarted = Site(cfg, index=0, node_config=dict(site.context.node_config))
    restarted.arrays = site.arrays
    spend3, _ = restarted.train_round(3)
    assert spend3["status"] == "budget_exhausted"
    assert f"{expected[2]:.4f} > budget 0.8" in spend3["reason"]
    assert spend3["epsilon"] == pytest.approx(expected[1], abs=1e-6)
    assert spend3["noise_multiplier"] == sigma  # kept from the ledger, not recalibrated
    lines = ledger_lines(restarted)
    assert [(x["round"], x["status"]) for x in lines] == [
        (1, "trained"), (2, "trained"), (3, "budget_exhausted")]
    assert {x["scope"] for x in lines} == {"data"} and len({x["fingerprint"] for x in lines}) == 1


def test_epsilon_composes_across_runs_on_the_same_data_unless_scoped_to_one_run(shared_data):
    cfg = heart_cfg(shared_data, "privacy.noise_multiplier=1.5 privacy.target_epsilon=null "
                    "num_rounds=2 task.local_epochs=1")
    run1 = Site(cfg, index=3)  # VA: 6 Poisson batches per epoch
    run1.train_round(1)
    state = {"state-dir": run1.context.node_config["state-dir"]}
    spend, _ = Site(cfg, index=3, node_config=state, run_id=2).train_round(1)
    assert spend["epsilon"] == pytest.approx(opacus_epsilon([(1.5, 1 / 6, 12)]), abs=1e-6)
    scoped = Site(cfg, index=3, node_config={**state, "privacy-ledger-scope": "run"}, run_id=3)
    spend, _ = scoped.train_round(1)
    assert spend["epsilon"] == pytest.approx(opacus_epsilon([(1.5, 1 / 6, 6)]), abs=1e-6)
    assert [(x["run"], x["scope"]) for x in ledger_lines(scoped)] == [
        (1, "data"), (2, "data"), (3, "run")]


def test_a_capped_site_refuses_what_its_node_config_does_not_accept(shared_data):
    data = f"task=heart_disease task.data_dir={shared_data / 'heart_disease'} num_rounds=2 "
    capped = {"privacy-epsilon-budget": 2.0}
    # privacy=none: no epsilon bound at all -> refused, the reason reaches the server as an error
    site = Site(compose_config(data), index=0, node_config=capped)
    with pytest.raises(PrivacyRefused, match=r"accepts privacy mechanism.*privacy=none"):
        site.train_round(1)
    assert ledger_lines(site)[-1]["status"] == "refused"
    # a mechanism the hospital did not list
    site = Site(compose_config(data + "privacy=central_dp"), index=0,
                node_config={**capped, "privacy-mechanisms": "local_dp"})
    spend, reply = site.train_round(1)
    assert spend["status"] == "refused" and "privacy=central_dp" in spend["reason"]
    assert reply.content["metrics"]["num-examples"] == 0
    # a delta above the hospital's (default 1e-5), whatever epsilon the server targets
    for extra in ("privacy.target_delta=1e-4", "privacy.budget.delta=0.9"):
        site = Site(compose_config(data + "privacy=local_dp privacy.target_epsilon=40 " + extra),
                    index=0, node_config=capped)
        spend, _ = site.train_round(1)
        assert spend["status"] == "refused" and "above this hospital's limit 1e-05" in spend[
            "reason"], extra
    # never above 1/(10 N): 199 training records -> a node delta of 0.01 is cut to 5.0e-4
    site = Site(compose_config(data + "privacy=local_dp privacy.target_epsilon=40 "
                               "privacy.target_delta=1e-3"), index=0,
                node_config={**capped, "privacy-delta": 0.01})
    spend, _ = site.train_round(1)
    assert spend["status"] == "refused" and "limit 0.000502513" in spend["reason"]


def test_the_server_rejects_a_falling_or_wrong_epsilon(shared_data):
    cfg = heart_cfg(shared_data, "privacy.noise_multiplier=1.5 privacy.target_epsilon=null "
                    "num_rounds=3 task.local_epochs=1")
    guard = wrap_strategy(FedAvg(), cfg, 4, {1: "cleveland", 2: "hungary"})
    honest, forgetful = Site(cfg, index=0), Site(cfg, index=1)
    for r in (1, 2):
        guard.aggregate_train(r, [honest.train_round(r)[1], forgetful.train_round(r)[1]])
        assert {x["status"] for x in guard.pop_ledger()} == {"trained"}
    # hungary's SuperNode loses its ledger (new state folder) and reports round 1's epsilon
    lost = Site(cfg, index=1)
    _, bad = lost.train_round(3)
    _, good = honest.train_round(3)
    spend = read_spend(good.content)  # cleveland's report, tampered: epsilon halved
    spend["epsilon"] /= 2
    good.content["privacy"] = spend_record(spend)
    with pytest.raises(PrivacyStop, match="0 site"):  # both dropped: fewer than min_sites
        guard.aggregate_train(3, [good, bad])
    lines = {x["site"]: x for x in guard.pop_ledger()}
    assert lines["hungary"]["status"] == "rejected"
    assert "below" in lines["hungary"]["reason"] or "lower than before" in lines["hungary"][
        "reason"]
    assert lines["cleveland"]["status"] == "rejected"
    assert "disagrees with" in lines["cleveland"]["reason"]
    assert guard.eligible() == []
