"""Personalisation (fl_app/personalize.py) on the four real heart-disease hospitals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from fl_app.client_app import train as train_handler
from fl_app.config import ConfigError, compose_config, to_json
from fl_app.personalize import ROUNDS_KEY, STATE_KEY, check
from fl_app.site_runtime import STATS_KEY
from tasks import get_task
from tasks.base import SiteRef
from tasks.federated_stats import combine_moments, standardize

HEART = "experiment=heart_disease_fedavg"
# FedAvg that drifts little between the four very different hospitals: one local epoch at
# a small learning rate (the preset's 5 epochs at 0.05 end around 0.75-0.78 per hospital)
CALM = "num_rounds=10 task.lr=0.01 task.local_epochs=1"
GOAL = 0.83  # mean per-hospital accuracy the issue asks of the personal models


def _heart(shared_data: Path, extra: str) -> object:
    return compose_config(f"{HEART} task.data_dir={shared_data / 'heart_disease'} {extra}")


def site_indicator_baseline(cfg: object) -> tuple[float, dict[str, float]]:
    """Pooled logistic regression with a one-hot site indicator (scikit-learn, all training
    rows in one place, the federated statistics' standardisation): mean per-hospital test
    accuracy and each hospital's. The centralised bar personalisation is measured against."""
    from sklearn.linear_model import LogisticRegression

    task = get_task("heart_disease")
    names = task.site_names(cfg)
    sites = [task.load_site(cfg, SiteRef(n, index=i)) for i, n in enumerate(names)]
    stats = combine_moments([task.local_statistics(s) for s in sites])

    def rows(split: str) -> list[np.ndarray]:
        out = []
        for i, site in enumerate(sites):
            x = standardize(site.raw[f"x_{split}"], stats)
            out.append(np.hstack([x, np.tile(np.eye(len(sites))[i], (len(x), 1))]))
        return out

    train_x, test_x = rows("train"), rows("test")
    model = LogisticRegression(max_iter=5000).fit(
        np.vstack(train_x), np.concatenate([s.raw["y_train"] for s in sites]))
    per_site = {n: float(model.score(x, s.raw["y_test"]))
                for n, x, s in zip(names, test_x, sites, strict=True)}
    return float(np.mean(list(per_site.values()))), per_site


@pytest.mark.parametrize("privacy", ["local_dp", "central_dp"])
def test_personalisation_with_dp_is_refused(privacy: str) -> None:
    cfg = compose_config(f"{HEART} personalize=finetune privacy={privacy}")
    with pytest.raises(ConfigError, match="cannot be combined with privacy"):
        check(cfg)


def test_bad_personalisation_settings_are_one_clear_line() -> None:
    with pytest.raises(ConfigError, match=r"personalize\.params must be one of all, bias"):
        check(compose_config(f"{HEART} personalize=finetune personalize.params=head"))
    with pytest.raises(ConfigError, match=r"personalize\.lam must be >= 0"):
        check(compose_config(f"{HEART} personalize=ditto personalize.lam=-1"))
    with pytest.raises(ConfigError, match="personalize' must be one of"):
        compose_config(f"{HEART} personalize=fedper")


def test_ditto_personal_model_lives_in_context_state(shared_data: Path,
                                                     task_identity: None) -> None:
    """Two train messages to one real hospital: the personal model is created in round 1,
    continued in round 2, never sent; lam=0 (purely local) moves it further from the global
    model than a large lam."""
    task = get_task("heart_disease")
    distances = {}
    for lam in (0.0, 10.0):
        cfg = _heart(shared_data, f"personalize=ditto personalize.lam={lam}")
        site = task.load_site(cfg, SiteRef("hungary", index=1))
        stats = combine_moments([task.local_statistics(site)])
        torch.manual_seed(0)
        global_model = task.build_model(cfg, site.info)
        arrays = ArrayRecord(global_model.state_dict())
        context = Context(run_id=1, node_id=2, node_config={"partition-id": 1},
                          state=RecordDict(), run_config={})
        for server_round in (1, 2):
            config = ConfigRecord({"cfg": to_json(cfg), STATS_KEY: json.dumps(stats),
                                   "server-round": server_round})
            msg = Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=2,
                          message_type=MessageType.TRAIN)
            reply = train_handler(msg, context)
            assert not reply.has_error()
            assert reply.content["metrics"][ROUNDS_KEY] == server_round
            assert set(reply.content["arrays"].keys()) == set(arrays.keys())
        personal = context.state[STATE_KEY].to_torch_state_dict()
        distances[lam] = float(sum(torch.sum((personal[k] - v) ** 2)
                                   for k, v in global_model.state_dict().items()))
    assert distances[0.0] > 10 * distances[10.0] > 0


@pytest.fixture
def one_torch_thread() -> object:
    """One torch thread for this in-process run: on a shared 2-core machine two threads on a
    logistic regression mostly wait for each other (benchmarks/common.py limit_threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _run(shared_data: Path, folder: Path, extra: str, ray: bool = False
         ) -> tuple[dict, list[dict]]:
    """One federated run: Flower's simulation engine (``ray``) or the in-process LocalGrid
    (benchmarks/local_grid.py: the real ClientApp, protobuf on the wire, one persistent
    Context per hospital, seconds instead of a minute)."""
    cfg = _heart(shared_data, f"{extra} output_dir={folder}")
    if ray:
        from fl_app.simulation import simulate

        run = simulate(cfg, num_cpus=2).path
    else:
        from benchmarks.local_grid import LocalGrid, set_server_identity
        from fl_app.client_app import app as client_app
        from fl_app.experiment import run_experiment

        set_server_identity()
        run = run_experiment(LocalGrid(4, client_app), cfg).path
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return json.loads((run / "summary.json").read_text()), lines


def test_finetune_beats_the_global_model_per_hospital(shared_data: Path, tmp_path: Path,
                                                      one_torch_thread: None) -> None:
    summary, _ = _run(shared_data, tmp_path, f"{CALM} personalize=finetune")
    personal = summary["personalized"]
    assert {"pooled", "per_site", "mean_site_accuracy", "mean_site_auc", "worst_site"} <= \
        set(personal)
    assert sorted(personal["per_site"]) == sorted(summary["per_site"])
    assert personal["method"] == "finetune" and personal["missing_sites"] == []
    baseline, baseline_sites = site_indicator_baseline(_heart(shared_data, ""))
    gains = {s: round(g["accuracy_gain"], 4) for s, g in personal["gain"]["per_site"].items()}
    print(f"finetune (10 rounds): mean per-hospital accuracy "
          f"{personal['mean_site_accuracy']:.4f} vs "
          f"global {summary['mean_site_accuracy']:.4f}; gains {gains}; pooled logistic "
          f"regression with a site indicator {baseline:.4f} {baseline_sites}")
    assert personal["gain"]["global_mean_site_accuracy"] == summary["mean_site_accuracy"]
    assert personal["mean_site_accuracy"] > summary["mean_site_accuracy"]
    assert personal["mean_site_accuracy"] >= GOAL
    assert personal["pooled"]["num-examples"] == summary["pooled"]["num-examples"]
    # each hospital keeps its personal model in its own state folder, not in the run folder
    for site in summary["per_site"]:
        kept = list((tmp_path / "site_state" / site / "personal_models").glob("*finetune.pt"))
        assert len(kept) == 1, site
        assert set(torch.load(kept[0])) == set(torch.load(Path(summary["run_dir"]) /
                                                          "final_model.pt"))


@pytest.mark.e2e
def test_ditto_reports_personal_models_of_every_hospital(shared_data: Path, tmp_path: Path
                                                         ) -> None:
    rounds = 3  # Flower's simulation engine: the personal model survives in its node state
    summary, lines = _run(shared_data, tmp_path, f"{CALM} num_rounds={rounds} personalize=ditto",
                          ray=True)
    for site in summary["per_site"]:  # the personal model survived every round at its site
        assert [line["train"][site][ROUNDS_KEY] for line in lines] == list(range(1, rounds + 1))
    personal = summary["personalized"]
    assert personal["method"] == "ditto" and personal["settings"]["lam"] == 1.0
    assert sorted(personal["per_site"]) == sorted(summary["per_site"])
    assert personal["per_site"] != summary["per_site"]
    print(f"ditto ({rounds} rounds): mean per-hospital accuracy "
          f"{personal['mean_site_accuracy']:.4f} vs global "
          f"{summary['mean_site_accuracy']:.4f}; "
          f"{ {s: round(g['accuracy_gain'], 4) for s, g in personal['gain']['per_site'].items()} }")
