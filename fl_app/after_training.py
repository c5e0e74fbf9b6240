"""The stages after the last round that ask every hospital about the final model.

- contribution scores (``contribution=loo|shapley``, strategies/contribution.py): the
  coalition models go to every hospital in evaluate messages; each replies its validation
  metrics per coalition, pooled here into the utility of each coalition;
- the membership-inference audit (``audit.membership``, fl_app/site_audits.py): each
  hospital attacks the final model on its own patients and replies only the attack's AUC.

Messages go through the run's FederationGuard (a failed site is logged and recorded like in
a round) and each stage adds one entry to the audit trail: who was asked and who answered,
and what came out. A stage that fails (a site cannot answer, an undefined utility) is logged
and recorded in its summary.json section (``failed``); the run itself still completes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from logging import ERROR, INFO
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from omegaconf import DictConfig

from fl_app.audit import AuditTrail
from fl_app.federation_guard import FederationGuard, SiteFailure
from fl_app.metrics import pooled_metrics, site_name
from fl_app.site_audits import (
    COALITION_PREFIX,
    COALITIONS_KEY,
    MEMBERSHIP_KEY,
    MEMBERSHIP_RECORD,
)
from strategies import contribution
from strategies.contribution import Coalition, UpdateRecorder


class StageFailure(RuntimeError):
    """A stage after training that could not produce its result."""


def run_audits(guard: FederationGuard, cfg: DictConfig, record: ConfigRecord,
               final: ArrayRecord, strategy: Any, audit: AuditTrail,
               server_round: int) -> dict[str, Any]:
    """The summary.json sections of the stages the config asks for (may be empty)."""
    out: dict[str, Any] = {}
    recorder = contribution.recorder_of(strategy)
    if recorder is not None:
        out["contribution"] = _guarded("contribution", audit, guard, lambda: contribution_stage(
            guard, cfg, record, final, recorder, server_round))
    if cfg.get("audit") is not None and cfg.audit.get("membership", False):
        out["membership_inference"] = _guarded("membership", audit, guard, lambda: (
            membership_stage(guard, cfg, record, final, server_round)))
    return out


def _guarded(event: str, audit: AuditTrail, guard: FederationGuard, stage: Any
             ) -> dict[str, Any]:
    """Run one stage; its audit entry holds its exchanges and its result (or why it failed)."""
    start = len(guard.exchanges)
    try:
        section = stage()
    except (StageFailure, SiteFailure) as err:
        log(ERROR, "fedclinic: %s after training failed: %s", event, err)
        section = {"failed": str(err)}
    audit.append(event, exchanges=guard.exchanges[start:], result=section)
    return section


def _ask_every_site(guard: FederationGuard, cfg: DictConfig, contents: RecordDict
                    ) -> list[Message]:
    """Send ``contents`` to every site of the run as an evaluate message; the replies of all
    of them (StageFailure naming those that did not answer)."""
    nodes = list(guard.get_node_ids())
    messages = [Message(RecordDict(dict(contents)), dst_node_id=node,
                        message_type=MessageType.EVALUATE) for node in nodes]
    replies = [r for r in guard.send_and_receive(messages, timeout=cfg.round_timeout_s)
               if not r.has_error()]
    if len(replies) < len(nodes):
        answered = {site_name(r.content) for r in replies}
        missing = sorted(set(guard.sites[n] for n in nodes) - answered)
        raise StageFailure(f"{len(nodes) - len(replies)} of {len(nodes)} sites did not answer "
                           f"({', '.join(missing)}); see the site failures")
    return replies


# ----- contribution scores -----------------------------------------------------------------


def _chunks(items: list[Coalition], size: int) -> Iterator[list[Coalition]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def utility_of(pooled: dict[str, Any], utility: str) -> float:
    """The coalition's utility from its pooled validation metrics."""
    value = -float(pooled["loss"]) if utility == "neg_loss" else float(pooled.get(utility,
                                                                                  math.nan))
    if math.isnan(value):
        raise StageFailure(f"the pooled validation {utility} is undefined (e.g. one class "
                           "only in every validation split); use contribution.utility=neg_loss")
    return value


def contribution_stage(guard: FederationGuard, cfg: DictConfig, record: ConfigRecord,
                       final: ArrayRecord, recorder: UpdateRecorder, server_round: int
                       ) -> dict[str, Any]:
    """Score every hospital (strategies/contribution.py) from its sites' validation metrics."""
    players = recorder.sites
    if len(players) < 2:
        raise StageFailure(f"contribution scores need 2+ hospitals with aggregated updates, "
                           f"got {len(players)}")
    utility = str(cfg.contribution.utility)
    per_message = int(cfg.contribution.max_models_per_message)
    counter = iter(range(1 << 30))
    stages = [0]

    def value(coalitions: list[Coalition]) -> dict[Coalition, float]:
        out: dict[Coalition, float] = {}
        for chunk in _chunks(coalitions, per_message):
            names = {f"{COALITION_PREFIX}{next(counter)}": c for c in chunk}
            config = ConfigRecord({**dict(record), COALITIONS_KEY: json.dumps(list(names)),
                                   "server-round": server_round})
            contents = RecordDict({"arrays": final, "config": config,
                                   **{n: recorder.coalition_arrays(c) for n, c in names.items()}})
            replies = _ask_every_site(guard, cfg, contents)
            stages[0] += 1
            for name, coalition in names.items():
                per_site = {site_name(r.content): dict(r.content[name]) for r in replies}
                out[coalition] = utility_of(pooled_metrics(per_site), utility)
        return out

    log(INFO, "fedclinic: contribution=%s: each of %d sites evaluates %s on its validation "
        "split (utility: pooled validation %s)", contribution.method(cfg), len(players),
        contribution.planned_evaluations(cfg, len(players)), utility)
    found = contribution.score(cfg, players, value)
    section = contribution.summary(cfg, found, recorder)
    section["messages_per_site"] = stages[0]
    log(INFO, "fedclinic: contribution (%s, %s, utility %s): U(all) %.4f, U(initial) %.4f, "
        "gain %.4f; %d coalitions evaluated in %d message(s) per site; error %.4g",
        section["method"], section["estimator"], utility, found.full, found.empty, found.gain,
        section["evaluations"], stages[0], section["error"])
    for site in sorted(found.scores, key=found.scores.__getitem__, reverse=True):
        loo = (section["leave_one_out"] or {}).get(site)
        log(INFO, "    %-12s score %+.4f%s", site, found.scores[site],
            "" if loo is None else f"  leave-one-out {loo:+.4f}")
    return section


# ----- membership-inference audit ------------------------------------------------------------


def membership_stage(guard: FederationGuard, cfg: DictConfig, record: ConfigRecord,
                     final: ArrayRecord, server_round: int) -> dict[str, Any]:
    """Every hospital's loss-threshold attack AUC against the final model."""
    config = ConfigRecord({**dict(record), MEMBERSHIP_KEY: 1, "server-round": server_round})
    replies = _ask_every_site(guard, cfg, RecordDict({"arrays": final, "config": config}))
    found = {site_name(r.content): dict(r.content[MEMBERSHIP_RECORD]) for r in replies}
    aucs = {s: float(m["auc"]) for s, m in sorted(found.items())}
    defined = [v for v in aucs.values() if not math.isnan(v)]
    return {
        "attack": "loss_threshold",
        "per_site": aucs,
        "mean": float(np.mean(defined)) if defined else None,
        "members": {s: int(m["members"]) for s, m in sorted(found.items())},
        "non_members": {s: int(m["non-members"]) for s, m in sorted(found.items())},
        "non_member_split": {s: "val" if m.get("non-members-from-val") else "test"
                             for s, m in sorted(found.items())},
        "privacy": str(cfg.privacy.name),
    }


def log_membership(section: dict[str, Any], privacy: dict[str, Any]) -> None:
    """Print the attack AUCs beside each site's DP epsilon (end-of-run log)."""
    if "per_site" not in section:
        return
    epsilon = {s: spend.get("epsilon") for s, spend in privacy.get("per_site", {}).items()}
    mean = section["mean"]
    log(INFO, "fedclinic: membership inference (loss-threshold attack on the final model; "
        "AUC 0.5 = no leakage): mean AUC %s, privacy=%s",
        "n/a" if mean is None else f"{mean:.4f}", section["privacy"])
    for site, auc in section["per_site"].items():
        eps = epsilon.get(site)
        log(INFO, "    %-12s attack AUC %.4f  (%d members, %d non-members)  epsilon %s", site,
            auc, section["members"][site], section["non_members"][site],
            "none (no DP)" if eps is None else f"{eps:.4f}")
