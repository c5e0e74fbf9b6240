"""One federated experiment on a Grid: sites -> statistics -> rounds -> run folder."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from omegaconf import DictConfig, OmegaConf

import strategies
from fl_app import faults, personalize
from fl_app.after_training import log_membership, run_audits
from fl_app.audit import AuditTrail
from fl_app.checkpoint import (
    RoundOffset,
    chain,
    commit_round,
    resume_point,
    save_round_model,
    set_rng_state,
)
from fl_app.config import to_json
from fl_app.federation_guard import FederationGuard, SiteFailure
from fl_app.metrics import (
    SiteMetricsCollector,
    metrics_of,
    pooled_metrics,
    public_site_metrics,
    site_name,
)
from fl_app.privacy_ledger import LEDGER_FILE, PrivacyLedger
from fl_app.report import report_quietly
from fl_app.results import write_results
from fl_app.run_folder import RunFolder
from fl_app.run_log import brief_config_records
from fl_app.site_identity import RefusedNode, check_identities, load_registry
from fl_app.site_runtime import CONFIG_KEY, STATS_KEY
from fl_app.sites import (
    FederationError,
    expected_num_sites,
    global_statistics,
    model_info,
    query_sites,
    wait_for_nodes,
    wait_for_stable_nodes,
)
from fl_app.threshold import rule_of
from fl_app.tracking import Tracker
from strategies import compression, contribution, evaluate_in_train
from strategies.budget import PrivacyStop, secret_sample
from strategies.factory import WEIGHT_KEY
from strategies.secure_aggregation import check_secure_aggregation, secagg_name
from strategies.validation import round_rejections, skipped_reason
from tasks import get_task


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (model initialisation, node sampling)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_experiment(grid: Grid, cfg: DictConfig) -> RunFolder:
    """Run the experiment described by the resolved ``cfg``; return its run folder.

    Whatever ends the run early once its folder exists leaves an honest summary.json
    (``status: failed`` and the ``reason``), then propagates: the caller exits non-zero.
    The run report (report.md, fl_app.report) is written last, whatever the outcome.
    """
    folders: list[RunFolder] = []
    tracker = Tracker(cfg)  # tracking=mlflow only; the default imports and does nothing

    def created(run: RunFolder) -> None:
        folders.append(run)
        tracker.start(run)

    try:
        run = _experiment(grid, cfg, created, tracker.log_round)
    except Exception as err:
        if folders and "summary.json" not in folders[0].written:
            reason = str(err) or type(err).__name__
            head = AuditTrail(folders[0]).append("end", status="failed", reason=reason)
            folders[0].write_json("summary.json", {
                "task": cfg.task.name, "strategy": cfg.strategy.name, "status": "failed",
                "reason": reason, "run_dir": str(folders[0].path), "audit_sha256": head,
            })
        if folders:
            report_quietly(folders[0].path)
        tracker.end(folders[0] if folders else None)
        raise
    report_quietly(run.path)  # before tracking: report.md is among the run's artifacts
    tracker.end(run)
    return run


def _experiment(grid: Grid, cfg: DictConfig, created: Callable[[RunFolder], None],
                written: Callable[[dict[str, Any]], None]) -> RunFolder:
    """The experiment; ``created`` is told the run folder as soon as it exists, ``written``
    every metrics.jsonl line once it is written."""
    seed_everything(cfg.seed)
    rule_of(cfg)  # a bad task.threshold fails now, not after the first round
    check_secure_aggregation(cfg)  # a refused combination stops before any site is asked
    personalize.check(cfg)
    contribution.check(cfg)
    task = get_task(cfg.task.name)
    expected = expected_num_sites(cfg, task)
    if expected is None:  # simulated partition: one site per connected SuperNode
        nodes = wait_for_stable_nodes(grid, cfg.wait_for_nodes_s)
        cfg.partition.num_sites = len(nodes)
    else:
        nodes = wait_for_nodes(grid, expected, cfg.wait_for_nodes_s)
    # the query round includes each ClientApp's cold start (imports, data loading), so it may
    # take as long as connecting does: a short round_timeout_s bounds the training rounds
    query_timeout = max(cfg.round_timeout_s, cfg.wait_for_nodes_s)
    claims = query_sites(grid, cfg, nodes, query_timeout)
    injected = faults.check(cfg, {f.name: f.simulated for f in claims})
    run = RunFolder.open(Path(cfg.resume)) if cfg.get("resume") else RunFolder.create(cfg)
    created(run)
    audit = AuditTrail(run)
    if not cfg.get("resume"):
        audit.start()
    # after the folder exists: if too few sites are accepted, summary.json says who was refused
    facts, refused = _accepted_sites(claims, cfg)
    app = app_identity(grid)
    if app["fab_hash"]:  # empty in the in-process simulation (no FAB)
        log(INFO, "fedclinic: app %s %s, FAB sha256 %s", app["fab_id"], app["fab_version"],
            app["fab_hash"])
    log(
        INFO,
        "fedclinic: task=%s strategy=%s privacy=%s rounds=%d sites=%d; run folder %s",
        cfg.task.name,
        cfg.strategy.name,
        cfg.privacy.name,
        cfg.num_rounds,
        len(facts),
        run.path,
    )
    for f in facts:
        log(
            INFO,
            "  site %-12s train %5d  test %5d  (node %d)",
            f.name,
            f.num_train,
            f.num_test,
            f.node_id,
        )
    if injected:
        log(INFO, "fedclinic: injecting faults (simulation): %s",
            ", ".join(faults.describe(injected)))
    stats = global_statistics(facts)
    info = model_info(facts)
    run.write_json(
        "sites.json",
        {
            "sites": [
                {"name": f.name, "num_train": f.num_train, "num_test": f.num_test} for f in facts
            ],
            "feature_statistics": stats,
            "model_info": info,
        },
    )

    model = task.build_model(cfg, info)
    node_sites = {f.node_id: f.name for f in facts}
    collector = SiteMetricsCollector(cfg.task.get("threshold", "0.5"))
    strategy = strategies.build(
        cfg,
        len(facts),
        train_metrics_aggr_fn=collector.train,
        evaluate_metrics_aggr_fn=collector.evaluate,
        node_sites=node_sites,
        train_sizes={f.name: f.num_train for f in facts},
    )
    # evaluate_in_train: a round's evaluation comes with the next round's train replies
    # (strategies/evaluate_in_train.py); its metrics.jsonl line waits for it in `pending`
    deferred = SiteMetricsCollector()
    if evaluate_in_train.enabled(cfg):
        strategy = evaluate_in_train.EvaluateInTrain(
            strategy, cfg.num_rounds,
            lambda _round, replies: deferred.evaluate(replies, WEIGHT_KEY))
    ledger = PrivacyLedger(run, cfg, strategy)
    # Rounds see only the sites queried above, and a hospital that drops out never hangs the
    # server: on_site_failure decides between going on (while min_sites remain) and stopping.
    guard = FederationGuard(
        grid,
        node_sites,
        cfg.min_sites or len(facts),
        cfg.wait_for_nodes_s,
        cfg.get("on_site_failure", "continue"),
    )
    stopped: SiteFailure | None = None
    latest = {"arrays": ArrayRecord(model.state_dict())}  # the model after the last round
    record = ConfigRecord({CONFIG_KEY: to_json(cfg), STATS_KEY: json.dumps(stats) if stats else ""})
    site_names = list(node_sites.values())
    history: list[dict[str, Any]] = []
    resumed = (resume_point(run, strategy, "metrics.jsonl", [LEDGER_FILE])
               if cfg.get("resume") else None)
    if resumed is not None:
        latest["arrays"], history[:] = resumed.arrays, resumed.history
        audit.append("resume", after_round=resumed.done)
    aggregation = " > ".join(type(node).__name__ for node in chain(strategy))
    dp = OmegaConf.to_container(cfg.privacy)
    pending: list[dict[str, Any]] = []  # the previous round's line, waiting for its evaluation

    def write_line(line: dict[str, Any], evaluated: SiteMetricsCollector | None = None) -> None:
        if evaluated is not None:  # the evaluation arrived after the line was made
            fresh = _round_line(int(line["round"]), evaluated, site_names)
            line.update({k: fresh[k] for k in ("pooled", "per_site", "missing_sites")})
        history.append(line)
        run.append_jsonl("metrics.jsonl", line)
        written(line)
        _log_round(line, cfg.num_rounds)

    def end_of_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None
        latest["arrays"] = arrays
        ledger.flush()
        line = _round_line(server_round, collector, site_names)
        if secret_sample(cfg):  # which sites trained is the secret the accounting relies on
            line["train"] = {}
        line["failures"] = {
            f.site: f"{f.stage}: {f.reason}" for f in guard.failures if f.round == server_round
        }
        # secure aggregation whose sum failed under on_site_failure=continue: the round has
        # no aggregate (the global model is unchanged) and the run goes on
        secagg_failure = getattr(strategy, "failed_rounds", {}).get(server_round)
        if secagg_failure:
            line["failures"]["secure_aggregation"] = secagg_failure
        # updates update validation rejected, and why (strategies/validation.py)
        line["rejected"] = {
            r["site"]: r["reason"] for r in round_rejections(strategy, server_round)
        }
        # bytes each site's train message and reply carried (strategies/compression.py)
        line.update(compression.round_bytes(strategy, server_round))
        skipped = skipped_reason(strategy, server_round)
        if skipped is not None:
            line["skipped"] = skipped
        for earlier in pending:  # evaluated in this round's train messages
            write_line(earlier, deferred)
        pending.clear()
        deferred.reset()
        state_dict = arrays.to_torch_state_dict()
        run.save_model("checkpoints/latest.pt", state_dict)
        model_sha = save_round_model(run, server_round, state_dict)
        head = audit.round(server_round, line, guard.exchanges, aggregation, dp,
                           ledger.last_lines, model_sha)
        if isinstance(strategy, evaluate_in_train.EvaluateInTrain) and line["train"] and \
                server_round < cfg.num_rounds:
            # evaluate_in_train: written once its evaluation arrives (next round); a round
            # whose line is not written is not committed, so resume never skips a line
            pending.append(line)
        else:
            write_line(line)
            commit_round(run, server_round, model_sha, strategy, head)  # resume goes on from here
        collector.reset()
        # SiteFailure (caught below, summary.json still written); a round validation skipped
        # keeps the global model and goes on
        if not line["train"] and not secagg_failure and skipped is None:
            raise SiteFailure(
                f"round {server_round}: no site returned a model update, so the run stops "
                f"instead of going on with an untrained model. Site errors: {line['failures']}"
            )
        return None

    done = resumed.done if resumed is not None else 0
    runner = RoundOffset(strategy, done) if done else strategy  # rounds keep their numbers
    if resumed is not None:
        set_rng_state(resumed.rng)  # as it was right after round `done`
    try:
        with brief_config_records():
            result = runner.start(
                grid=guard,
                initial_arrays=latest["arrays"],
                num_rounds=cfg.num_rounds - done,
                timeout=cfg.round_timeout_s,
                train_config=ConfigRecord(dict(record)),
                evaluate_config=ConfigRecord(dict(record)),
                evaluate_fn=runner.offset_fn(end_of_round) if done else end_of_round,
            ) if cfg.num_rounds > done else None
        final = result.arrays if result is not None else latest["arrays"]
    except PrivacyStop as stop:  # too few sites with privacy budget left: a clean, early end
        log(INFO, "fedclinic: stopping after %d round(s): %s", len(history) + len(pending), stop)
        final = latest["arrays"]
    except SiteFailure as failure:  # a hospital dropped out: end cleanly, keep what was done
        log(ERROR, "fedclinic: stopping after %d round(s): %s", len(history) + len(pending),
            failure)
        final, stopped = latest["arrays"], failure
    if pending:  # the run ended early: evaluate the model of its last round now
        _evaluate_last(strategy, pending[0], latest["arrays"], record, guard, cfg)
        write_line(pending.pop(), collector)
    ledger.flush()
    if stopped is None and history and collector.threshold_logit is not None:
        _at_threshold(guard, cfg, record, final, collector.threshold_logit, history)
    # contribution scores and the membership-inference audit (fl_app/after_training.py)
    audits = (run_audits(guard, cfg, record, final, strategy, audit, len(history))
              if stopped is None and history else {})
    outcome = {**_outcome(guard, stopped), "refused_nodes": [r.as_dict() for r in refused],
               "app": app, **audits}
    if stopped is None and history and personalize.method(cfg) != personalize.NONE:
        # each hospital's own model, evaluated where it lives (fl_app/personalize.py)
        outcome["personalized"] = personalize.evaluate_personal(
            guard, cfg, record, final, len(history), collector.threshold_logit,
            history[-1]["per_site"], cfg.round_timeout_s)
    outcome["audit_sha256"] = audit.append("end", status=outcome["status"],
                                           reason=outcome["reason"])
    _finish(run, cfg, final, history, ledger, outcome)
    if stopped is not None:
        raise SiteFailure(f"{stopped}. The {len(history)} completed round(s) are in {run.path}")
    return run


def _at_threshold(grid: Grid, cfg: DictConfig, record: ConfigRecord, arrays: ArrayRecord,
                  threshold_logit: float, history: list[dict[str, Any]]) -> None:
    """One more evaluation of the final model: every site reports its exact test accuracy,
    sensitivity and specificity at the operating threshold the server chose from the last
    round's validation score groups (fl_app.threshold). The last history line (what
    summary.json reports) then carries them; on a site failure the argmax (0.5) metrics stay.
    """
    config = ConfigRecord({**dict(record), "threshold-logit": threshold_logit,
                           "server-round": len(history)})
    nodes = list(grid.get_node_ids())
    messages = [Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=node,
                        message_type=MessageType.EVALUATE) for node in nodes]
    replies = [r for r in grid.send_and_receive(messages, timeout=cfg.round_timeout_s)
               if not r.has_error()]
    if len(replies) != len(nodes):
        log(ERROR, "fedclinic: %d of %d sites did not report at the chosen threshold; the "
            "summary keeps the 0.5 metrics", len(nodes) - len(replies), len(nodes))
        return
    per_site = {site_name(r.content): metrics_of(r.content) for r in replies}
    pooled = pooled_metrics(per_site)
    history[-1] = {**history[-1], "pooled": pooled,
                   "per_site": {s: public_site_metrics(m) for s, m in per_site.items()}}
    log(INFO, "fedclinic: operating threshold %.4g (task.threshold=%s): pooled accuracy %.4f "
        "sensitivity %.4f specificity %.4f", pooled["threshold"], cfg.task.threshold,
        pooled["accuracy"], pooled.get("sensitivity", float("nan")),
        pooled.get("specificity", float("nan")))


def _accepted_sites(facts: list[Any], cfg: DictConfig) -> tuple[list[Any], list[RefusedNode]]:
    """The query round's sites whose claimed name stands (``site_registry``, see
    fl_app.site_identity); refused nodes are logged. FederationError when too few remain."""
    registry = load_registry(cfg.site_registry) if cfg.site_registry else None
    accepted, refused = check_identities(facts, registry)
    for r in refused:
        log(WARNING, "fedclinic: refused node %d (claims site '%s'): %s", r.node_id,
            r.claimed_site, r.reason)
    needed = cfg.min_sites or 1
    if len(accepted) < needed:
        raise FederationError(
            f"only {len(accepted)} site(s) accepted, min_sites={needed}; refused: "
            + "; ".join(f"node {r.node_id} ({r.claimed_site}): {r.reason}" for r in refused))
    return accepted, refused


def app_identity(grid: Grid) -> dict[str, str]:
    """The app version this run executes: Flower's FAB id, version and SHA-256 (the hash
    ``submit.py`` prints), so a hospital can check which code ran."""
    run = getattr(grid, "run", None)
    return {key: str(getattr(run, key, "") or "") for key in ("fab_id", "fab_version", "fab_hash")}


def _evaluate_last(strategy: Any, line: dict[str, Any], arrays: ArrayRecord,
                   record: ConfigRecord, guard: FederationGuard, cfg: DictConfig) -> None:
    """Evaluate the model of ``line``'s round with evaluate messages (evaluate_in_train, for a
    run that ended before its last round); a site that cannot answer is missing from it."""
    try:
        strategy.evaluate_now(int(line["round"]), arrays, ConfigRecord(dict(record)), guard,
                              cfg.round_timeout_s)
    except SiteFailure as failure:  # the sites still there could not all answer
        log(ERROR, "fedclinic: round %d's model could not be evaluated everywhere: %s",
            line["round"], failure)


def _outcome(guard: FederationGuard, stopped: SiteFailure | None) -> dict[str, Any]:
    """summary.json keys on how the run ended and which sites failed when."""
    return {
        "status": "failed" if stopped is not None else "completed",
        "reason": None if stopped is None else str(stopped),
        "sites": sorted(guard.sites.values()),
        "site_failures": guard.failure_log(),
    }


def _round_line(
    server_round: int, collector: SiteMetricsCollector, sites: list[str]
) -> dict[str, Any]:
    """One metrics.jsonl line: pooled and per-site test metrics, per-site train metrics.

    ``aggregated_sites``: the sites whose updates are in the round's aggregate (the replies
    the aggregator averaged; under secure aggregation, the sites in the unmasked sum).
    """
    return {
        "round": server_round,
        "pooled": collector.last_pooled,
        "per_site": {s: public_site_metrics(m) for s, m in collector.last_evaluate.items()},
        "train": collector.last_train,
        "aggregated_sites": sorted(collector.last_train),
        "missing_sites": [s for s in sites if s not in collector.last_evaluate],
    }


def _log_round(line: dict[str, Any], num_rounds: int) -> None:
    pooled = line["pooled"]
    log(
        INFO,
        "[round %d/%d] pooled: accuracy %.4f  auc %s  loss %.4f  (%d sites)",
        line["round"],
        num_rounds,
        pooled.get("accuracy", float("nan")),
        _fmt(pooled.get("auc")),
        pooled.get("loss", float("nan")),
        len(line["per_site"]),
    )
    for site, m in sorted(line["per_site"].items()):
        train = line["train"].get(site, {})
        log(
            INFO,
            "    %-12s accuracy %.4f  auc %s  loss %.4f  train_loss %s  n=%d",
            site,
            m["accuracy"],
            _fmt(m.get("auc")),
            m["loss"],
            _fmt(train.get("train_loss")),
            m["num-examples"],
        )


def _fmt(value: Any) -> str:
    return (
        "n/a" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.4f}"
    )


def _finish(
    run: RunFolder,
    cfg: DictConfig,
    arrays: ArrayRecord,
    history: list[dict[str, Any]],
    ledger: PrivacyLedger,
    outcome: dict[str, Any] | None = None,
) -> None:
    """Write the final model, summary and plot; print where the run folder is."""
    privacy = ledger.summary()
    membership = (outcome or {}).get("membership_inference")
    if membership and "per_site" in membership:  # the empirical leakage beside the formal one
        membership["epsilon"] = {s: spend.get("epsilon")
                                 for s, spend in privacy.get("per_site", {}).items()} or None
    summary = write_results(
        run,
        history,
        arrays.to_torch_state_dict(),
        {
            "task": cfg.task.name,
            "strategy": cfg.strategy.name,
            "privacy": privacy,
            "threshold_rule": cfg.task.get("threshold"),
            "secure_aggregation": secagg_name(cfg),
            "compression": compression.summary(cfg, history),
            **(outcome or {"status": "completed"}),
        },
        f"{cfg.task.name} / {cfg.strategy.name} / privacy={cfg.privacy.name}",
    )
    log(
        INFO,
        "fedclinic: mean per-site accuracy %s, mean per-site AUC %s, pooled AUC %s; "
        "worst site %s",
        _fmt(summary["mean_site_accuracy"]),
        _fmt(summary["mean_site_auc"]),
        _fmt(summary["pooled"].get("auc")),
        summary["worst_site"].get("accuracy", {}).get("site"),
    )
    ledger.log_final(summary["privacy"])
    if membership:
        log_membership(membership, summary["privacy"])
    log(INFO, "fedclinic: run folder: %s", run.path)
