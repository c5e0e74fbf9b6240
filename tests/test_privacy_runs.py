"""Whole runs (Flower simulation, four real heart-disease hospitals) with privacy budgets.

Each run is checked against predictions made here with Opacus directly: which round each
hospital stops in, the epsilon in every ledger line, and when the run must end.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant

from fl_app.config import compose_config
from fl_app.simulation import simulate
from strategies.budget import LEDGER_KEYS
from tasks import SiteRef, get_task

DELTA = 1e-5
SIGMA, BUDGET, MIN_SITES = 1.5, 5.0, 2


def rdp_epsilon(noise: float, q: float, steps: int) -> float:
    acc = RDPAccountant()
    acc.history = [(noise, q, steps)]
    return acc.get_epsilon(delta=DELTA)


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_ledger_keys(lines: list[dict]) -> None:
    for line in lines:  # exactly the interface keys, plus status (and why a site stopped)
        assert set(line) - {"status", "reason"} == set(LEDGER_KEYS), line


@pytest.fixture(scope="module")
def local_run(shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("local_dp")
    cfg = compose_config(
        f"task=heart_disease task.data_dir={shared_data / 'heart_disease'} privacy=local_dp "
        f"privacy.noise_multiplier={SIGMA} privacy.target_epsilon=null "
        f"privacy.budget.epsilon={BUDGET} privacy.budget.min_sites={MIN_SITES} "
        f"num_rounds=10 output_dir={out}"
    )
    return cfg, simulate(cfg, num_cpus=2).path


def predicted_local(cfg) -> dict[str, tuple[float, int, int]]:
    """Per hospital: (sample rate, steps per round, last round within the budget)."""
    task = get_task("heart_disease")
    out = {}
    for i, name in enumerate(task.site_names(cfg)):
        n = task.load_site(cfg, SiteRef(name, index=i)).num_train
        batches = int(1 / (1 / math.ceil(n / 16)))  # Opacus's Poisson loader length
        q, steps = 1 / batches, 5 * batches
        last = 0
        while rdp_epsilon(SIGMA, q, steps * (last + 1)) <= BUDGET:
            last += 1
        out[name] = (q, steps, last)
    return out


def test_local_dp_sites_stop_on_the_predicted_round_and_the_run_ends_cleanly(local_run):
    cfg, run_dir = local_run
    plan = predicted_local(cfg)
    # with sigma 1.5 and epsilon 5 the four hospitals stop at different rounds
    assert sorted(p[2] for p in plan.values()) == [0, 1, 3, 4]
    stop = next(r for r in range(1, 12) if sum(p[2] >= r for p in plan.values()) < MIN_SITES)
    lines = read_lines(run_dir / "privacy_ledger.jsonl")
    check_ledger_keys(lines)
    assert len(lines) == 4 * stop  # one line per site per round, the stopping round included
    by = {(x["site"], x["round"]): x for x in lines}
    for site, (q, steps, last) in plan.items():
        for r in range(1, stop + 1):
            line = by[(site, r)]
            if r <= last:
                assert line["status"] == "trained", line
                assert line["steps"] == steps and line["sample_rate"] == pytest.approx(q)
                assert line["noise_multiplier"] == SIGMA and line["mechanism"] == "local_dp"
                assert line["epsilon"] == pytest.approx(rdp_epsilon(SIGMA, q, steps * r),
                                                        abs=1e-6)
            elif r == last + 1:
                assert line["status"] == "budget_exhausted", line
                assert line["steps"] == 0 and "budget 5.0" in line["reason"]
            else:
                assert line["status"] == "excluded" and line["steps"] == 0
    # epsilon grows with the rounds (rounds 1 and 3 of the hospitals that trained that long)
    cleveland = [by[("cleveland", r)]["epsilon"] for r in (1, 2, 3)]
    assert cleveland[0] < cleveland[1] < cleveland[2]

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_completed"] == stop - 1
    assert len(read_lines(run_dir / "metrics.jsonl")) == stop - 1
    assert (run_dir / "final_model.pt").is_file()
    privacy = summary["privacy"]
    assert privacy["mechanism"] == "local_dp" and "min_sites=2" in privacy["stopped_early"]
    for site, (q, steps, last) in plan.items():
        final = privacy["per_site"][site]
        assert final["epsilon"] == pytest.approx(
            rdp_epsilon(SIGMA, q, steps * last) if last else 0.0, abs=1e-6)
        assert final["epsilon"] <= BUDGET and final["delta"] == DELTA
    assert summary["per_site"]  # evaluation of the rounds that completed is kept


@pytest.fixture(scope="module")
def central_run(shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("central_dp")
    cfg = compose_config(
        f"task=heart_disease task.data_dir={shared_data / 'heart_disease'} "
        "privacy=central_dp_adaptive privacy.noise_multiplier=1.0 privacy.budget.epsilon=8.0 "
        f"num_rounds=5 output_dir={out}"
    )
    return cfg, simulate(cfg, num_cpus=2).path


def test_central_dp_client_side_adaptive_run_accounts_and_stops_at_the_budget(central_run):
    _, run_dir = central_run
    eps = [rdp_epsilon(1.0, 1.0, r) for r in (1, 2, 3)]
    assert eps[1] <= 8.0 < eps[2]  # the third release would break the budget
    lines = read_lines(run_dir / "privacy_ledger.jsonl")
    check_ledger_keys(lines)
    assert len(lines) == 4 * 3
    for line in lines:
        assert line["mechanism"] == "central_dp" and line["sample_rate"] == 1.0
        assert line["noise_multiplier"] == 1.0 and line["accountant"] == "rdp"
        if line["round"] <= 2:
            assert line["status"] == "trained" and line["steps"] == 1
            assert line["epsilon"] == pytest.approx(eps[line["round"] - 1], abs=1e-6)
        else:  # each hospital refuses the release that would exceed its budget
            assert line["status"] == "budget_exhausted" and line["steps"] == 0
            assert line["epsilon"] == pytest.approx(eps[1], abs=1e-6)
    norms = [x["clipping_norm"] for x in lines if x["site"] == "cleveland"]
    assert norms[0] == pytest.approx(0.1) and norms[1] != norms[0]  # adaptive clipping
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_completed"] == 2
    central = summary["privacy"]["central"]
    assert central["epsilon"] == pytest.approx(eps[1], abs=1e-6) and central["releases"] == 2
    assert central["clipping"] == "client" and central["adaptive"] is True
    assert all(s["epsilon"] <= 8.0 for s in summary["privacy"]["per_site"].values())
    # adaptive clipping's per-site clipped bit is never written (only its noisy sum is used)
    for name in ("metrics.jsonl", "summary.json", "privacy_ledger.jsonl"):
        assert "norm_bit" not in (run_dir / name).read_text(), name
    # each hospital's own ledger (simulation: <output_dir>/site_state/<site>) has its releases
    site_ledger = next((run_dir.parent / "site_state" / "cleveland").rglob("*.jsonl"))
    own = [json.loads(x) for x in site_ledger.read_text().splitlines()]
    assert [(x["status"], x.get("steps")) for x in own] == [
        ("trained", 1), ("trained", 1), ("budget_exhausted", 0)]
    assert own[1]["epsilon"] == pytest.approx(eps[1], abs=1e-6)


def test_run_report_of_a_local_dp_run_reads_from_its_files(local_run, tmp_path):
    """report.md (fl_app.report) after the local-DP run: the sections a clinician reads, with
    the run's own numbers; confusion counts that add up to each hospital's class counts;
    ``python -m fl_app.report`` rebuilds it identically from a copy of the folder."""
    import shutil

    from fl_app.report import main as report_main

    _, run_dir = local_run
    text = (run_dir / "report.md").read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    for heading in ("# Run report: heart disease / fedavg / local_dp", "## What was run",
                    "## Results of the final model", "## Each hospital",
                    "## Operating threshold and confusion counts", "## Over the rounds",
                    "## Privacy", "## Secure aggregation, rejected updates, dropped hospitals",
                    "## What the numbers mean"):
        assert heading in text, heading
    assert "each site is a real hospital" in text and "Local differential privacy" in text
    worst = summary["worst_site"]["accuracy"]
    assert f"| worst hospital (accuracy) | {worst['value']:.3f} | {worst['site']}, " in text
    for site, spend in summary["privacy"]["per_site"].items():
        assert f"| {site} | {spend['epsilon']:.3f} | {spend['rounds_trained']} |" in text
    assert "stopped: one more round would exceed its budget" in text  # stops in rounds 1..4
    assert "The run stopped early" in text and "min_sites=2" in text
    for site, m in summary["per_site"].items():  # TP + FN = positives, TN + FP = negatives
        tp = round(m["sensitivity"] * m["num-positive"]) if m["num-positive"] else 0
        tn = round(m["specificity"] * m["num-negative"]) if m["num-negative"] else 0
        assert m["num-positive"] + m["num-negative"] == m["num-examples"]
        row = f"| {site} | {tp} | {m['num-positive'] - tp} | {tn} | {m['num-negative'] - tn} |"
        assert row in text, row
    for plot in ("plots/metrics.png", "plots/sites.png", "plots/privacy_epsilon.png"):
        assert f"]({plot})" in text and (run_dir / plot).stat().st_size > 10_000, plot

    copy = tmp_path / run_dir.name
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("*.pt", "report.md", "plots"))
    assert report_main([str(copy)]) == 0
    assert (copy / "report.md").read_text() == text
    assert (copy / "plots" / "privacy_epsilon.png").is_file()
    assert report_main([str(tmp_path / "nowhere")]) == 2  # not a run folder: one line, exit 2


def test_run_report_shows_optional_sections_when_present(local_run, tmp_path):
    """Contribution scores, personalised models and membership-inference AUCs appear in the
    report when summary.json carries them (other features write them); absent, their
    sections are left out. Bytes on the wire (metrics.jsonl) are totalled."""
    import shutil

    from fl_app.report import write_report

    _, run_dir = local_run
    text = (run_dir / "report.md").read_text()
    for heading in ("## What each hospital contributes", "## Personalised models",
                    "membership-inference AUC"):
        assert heading not in text, heading
    lines = read_lines(run_dir / "metrics.jsonl")  # bytes_up: {site: bytes} every round
    total_up = sum(sum(line["bytes_up"].values()) for line in lines) / 1e3  # kB
    assert "## What the wire carried" in text and f"| {total_up:.3f} |" in text
    assert (run_dir / "plots" / "communication.png").is_file()
    copy = tmp_path / run_dir.name
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("*.pt", "report.md", "plots"))
    summary = json.loads((copy / "summary.json").read_text())
    sites = sorted(summary["per_site"])
    summary["contribution"] = {  # the shape of strategies/contribution.py summary()
        "method": "shapley", "utility": "auc", "scores": {s: 0.1 * i for i, s in
                                                          enumerate(sites)},
        "standard_error": {s: 0.0 for s in sites}, "leave_one_out": {s: 0.05 for s in sites},
        "utility_full": 0.9, "utility_initial": 0.5, "sum_of_scores": 0.6, "evaluations": 16}
    summary["personalized"] = {"per_site": {s: {**m, "accuracy": m["accuracy"] + 0.01}
                                            for s, m in summary["per_site"].items()},
                               "mean_site_accuracy": summary["mean_site_accuracy"] + 0.01}
    summary["membership_inference"] = {"attack": "loss_threshold", "per_site": {
        s: 0.5 + 0.01 * i for i, s in enumerate(sites)}}
    (copy / "summary.json").write_text(json.dumps(summary))
    text = write_report(copy).read_text()
    assert "## What each hospital contributes" in text and "Method: shapley" in text
    assert f"| {sites[-1]} | {0.1 * (len(sites) - 1):.3f} | 0.000 | 0.050 |" in text
    assert "the scores add up to 0.600" in text
    assert "## Personalised models" in text and "| +0.010 |" in text
    spend = summary["privacy"]["per_site"][sites[1]]
    assert f"| {sites[1]} | {spend['epsilon']:.3f} |" in text and "| 0.510 |" in text
