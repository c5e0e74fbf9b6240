"""Server side of privacy: budgets, exclusion, central accounting and the ledger lines.

``wrap_strategy`` is what the strategy factory calls. For ``local_dp`` it wraps the base
strategy in a ``PrivacyGuard``; for ``central_dp`` it first wraps it with Flower's DP wrapper
(``strategies.central_dp``) and then with the guard. The guard

- collects each site's reported spend (local DP) or composes the central mechanism's
  epsilon per site with an Opacus accountant (central DP),
- drops sites whose budget is exhausted (they answered "budget_exhausted") from every later
  training round, and stops the run (``PrivacyStop``) when fewer than
  ``privacy.budget.min_sites`` sites have budget left,
- keeps one ledger line per site per round for ``privacy_ledger.jsonl``.

- does not trust the replies (a curious or faulty site, or a tampered reply): it sets the
  equal FedAvg weights itself (``dp-weight`` = 1, whatever a reply says), rejects a
  client-side-clipped update above the clipping norm it asked for, and rejects a local-DP
  report whose epsilon is lower than before, lower than what this run alone released, or
  different from the epsilon recomputed from the (noise, sample rate, steps) history sent,
- samples sites with the operating system's entropy (Flower samples with Python's global
  generator, which the run seeds with the public ``seed``).

Central DP accounting model (stated in docs/privacy.md): each round is one Gaussian release
with the wrapper's noise multiplier and sensitivity ``clipping_norm / m`` (m = number of
updates averaged, treated as public). Who was sampled is published (ledger, metrics), so by
default no amplification is claimed: q = 1 for the sites whose update was averaged, and a
site not sampled spends nothing. ``privacy.secret_sample=true`` keeps the sample out of the
ledger and metrics and accounts Poisson sampling at q = (sites sampled) / (sites connected).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from omegaconf import DictConfig

from strategies.accounting import AccountantState, Step, add_steps, epsilon, total_steps
from strategies.budget import (
    LEDGER_KEYS,
    STATUS_ERROR,
    STATUS_EXCLUDED,
    STATUS_EXHAUSTED,
    STATUS_IN_ROUND,
    STATUS_NO_REPLY,
    STATUS_NOT_SAMPLED,
    STATUS_REFUSED,
    STATUS_REJECTED,
    STATUS_TRAINED,
    UNIFORM_WEIGHT_KEY,
    PrivacyConfigError,
    PrivacyStop,
    check_privacy_config,
    min_sites,
    read_spend,
    secret_sample,
    site_budget,
)
from strategies.central_dp import (
    accounted_noise_multiplier,
    build_central_dp,
    calibrate_central_dp,
)
from strategies.wrapper import StrategyWrapper, innermost

SITE_RECORD = "site"  # ConfigRecord {"name": site} in every reply (fl_app.metrics.SITE_RECORD)
EPSILON_TOLERANCE = 1e-6  # relative: a reported epsilon must match the recomputation
NORM_TOLERANCE = 1e-4  # relative: float32 rounding of an update clipped at the site
_ENTROPY = random.SystemRandom()


class EntropySampledGrid:
    """A Grid whose ``get_node_ids`` comes in an order drawn from the OS's entropy.

    Flower's ``sample_nodes`` takes ``random.sample(node_ids, k)`` from Python's global
    generator, which the run seeds with its public ``seed``. A secretly shuffled population
    makes that sample uniform and unpredictable whatever the global generator's state.
    """

    def __init__(self, grid: Grid) -> None:
        self._grid = grid

    def get_node_ids(self) -> list[int]:
        """The connected node ids, secretly shuffled."""
        nodes = list(self._grid.get_node_ids())
        _ENTROPY.shuffle(nodes)
        return nodes

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def secure_aggregation_on(cfg: DictConfig) -> bool:
    """Whether updates reach the server masked/encrypted (issue 8: config group ``secagg``).

    The guard then sees the unmasked average in every reply, not single updates.
    """
    from strategies.secure_aggregation import secagg_name  # it imports this package's budget

    return secagg_name(cfg) != "none"


def update_norm(reply: ArrayRecord, current: ArrayRecord) -> float:
    """L2 norm of ``reply - current`` over every array (float64; a zero update is 0)."""
    total = 0.0
    for new, old in zip(reply.to_numpy_ndarrays(), current.to_numpy_ndarrays(), strict=True):
        diff = np.asarray(new, dtype=np.float64) - np.asarray(old, dtype=np.float64)
        total += float(np.sum(diff * diff))
    return math.sqrt(total)


def sample_size(strategy: Strategy, num_nodes: int) -> int:
    """How many nodes FedAvg's ``configure_train`` samples out of ``num_nodes``."""
    fraction = float(getattr(strategy, "fraction_train", 1.0))
    least = int(getattr(strategy, "min_train_nodes", 1))
    return min(num_nodes, max(int(num_nodes * fraction), least))


def wrap_strategy(base: Strategy, cfg: DictConfig, num_sites: int,
                  node_sites: dict[int, str] | None = None,
                  inside_guard: Callable[[Strategy], Strategy] | None = None) -> Strategy:
    """``base`` wrapped for ``cfg.privacy`` (only by ``inside_guard`` when privacy is off).

    ``inside_guard`` (e.g. update validation) wraps the strategy just inside the budget guard,
    outside Flower's central-DP wrapper.
    """
    inside = inside_guard or (lambda s: s)
    mech = check_privacy_config(cfg)
    if mech == "none":
        return inside(base)
    if mech == "local_dp" and cfg.strategy.get("proximal_mu", 0.0) > 0:
        # Opacus replaces each gradient by its clipped, noised per-sample version, so the
        # proximal term's gradient would be silently dropped
        raise PrivacyConfigError(
            "privacy=local_dp does not support strategy.proximal_mu > 0 (DP-SGD drops the "
            "FedProx term); use strategy=fedavg"
        )
    if min_sites(cfg) > num_sites:
        raise PrivacyConfigError(
            f"privacy.budget.min_sites={min_sites(cfg)} but the federation has {num_sites} sites"
        )
    inner = base
    if mech == "central_dp":
        inner = build_central_dp(base, cfg, sample_size(base, num_sites))
    return PrivacyGuard(inside(inner), cfg, node_sites or {})


class PrivacyGuard(StrategyWrapper):
    """Budget-aware wrapper: exclusion of exhausted sites, central accounting, ledger lines."""

    def __init__(self, strategy: Strategy, cfg: DictConfig, node_sites: dict[int, str]) -> None:
        super().__init__(strategy)
        self.cfg = cfg
        self.mechanism = check_privacy_config(cfg)
        self.central = self.mechanism == "central_dp"
        self.accountant = cfg.privacy.accountant
        self.delta = cfg.privacy.target_delta
        self.min_sites = min_sites(cfg)
        self.node_sites = dict(node_sites)
        self.sites: list[str] = sorted(set(self.node_sites.values()))
        self.excluded: dict[str, str] = {}  # site -> why (budget exhausted in round r ...)
        self.last_spend: dict[str, dict[str, Any]] = {}  # local DP: latest report per site
        self.rounds_trained: dict[str, int] = {}
        self.pending: list[dict[str, Any]] = []
        self.stop_reason: str | None = None
        # central DP: the mechanism's own history and each site's (frozen once excluded)
        self.noise_multiplier = accounted_noise_multiplier(cfg) if self.central else None
        self.central_state = self._new_state()
        self.site_states: dict[str, AccountantState] = {s: self._new_state() for s in self.sites}
        self._sampled: set[str] = set()
        self._eligible_at_start: set[str] = set()
        self._round_q = 1.0
        self._round_clip: float | None = None
        self._round_arrays: ArrayRecord | None = None
        # the sample is published (ledger, metrics) unless privacy.secret_sample: then no
        # amplification is claimed
        self.secret_sample = secret_sample(cfg)
        self.check_norms = (self.central and str(cfg.privacy.get("clipping")) == "client"
                            and not secure_aggregation_on(cfg))
        # local DP: each site's last accepted report and the history this run saw it release
        self.reported: dict[str, dict[str, Any]] = {}
        self.run_histories: dict[str, list[Step]] = {}
        self.rejected: dict[str, str] = {}
        self.excluded_status: dict[str, str] = {}  # site -> budget_exhausted/refused/rejected

    # ----- helpers ---------------------------------------------------------------------------

    def _new_state(self) -> AccountantState:
        return AccountantState(self.accountant, self.delta, self.noise_multiplier)

    @property
    def base(self) -> Strategy:
        """The aggregating strategy under the DP wrapper."""
        return innermost(self.strategy)

    def eligible(self) -> list[str]:
        """Sites that still have budget (not excluded)."""
        return [s for s in self.sites if s not in self.excluded]

    def _site_of(self, node_id: int, content: Any = None) -> str:
        if node_id not in self.node_sites and content is not None and SITE_RECORD in content:
            self.node_sites[node_id] = str(content[SITE_RECORD]["name"])
        name = self.node_sites.get(node_id, f"node-{node_id}")
        if name not in self.sites:
            self.sites.append(name)
            self.site_states[name] = self._new_state()
        return name

    def _stop(self, server_round: int, why: str) -> None:
        self.stop_reason = f"round {server_round}: {why}"
        log(WARNING, "privacy: stopping the run: %s", self.stop_reason)
        raise PrivacyStop(self.stop_reason)

    def _line(self, site: str, server_round: int, status: str, steps: int,
              **fields: Any) -> dict[str, Any]:
        line: dict[str, Any] = dict.fromkeys(LEDGER_KEYS)
        line.update(site=site, round=server_round, mechanism=self.mechanism, delta=self.delta,
                    accountant=self.accountant, steps=steps, status=status)
        if self.central:
            line.update(noise_multiplier=self.noise_multiplier, clipping_norm=self._round_clip,
                        sample_rate=self._round_q, epsilon=self.site_states[site].epsilon())
        elif site in self.last_spend:
            spend = self.last_spend[site]
            own = ("site", "round", "steps")
            line.update({k: spend[k] for k in LEDGER_KEYS if k in spend and k not in own})
        else:
            line["epsilon"] = 0.0
        line.update(fields)
        return line

    def checkpoint_state(self) -> dict[str, Any]:
        """What a resumed run needs (fl_app/checkpoint.py): the accountants and the budgets."""
        return {
            "excluded": dict(self.excluded), "rounds_trained": dict(self.rounds_trained),
            "last_spend": json.dumps(self.last_spend),
            "central_state": self.central_state.to_json(),
            "site_states": {s: st.to_json() for s, st in self.site_states.items()},
            # the server's own check of the sites' reports (a resumed run keeps checking)
            "reported": json.dumps(self.reported),
            "run_histories": json.dumps({s: [list(x) for x in h]
                                         for s, h in self.run_histories.items()}),
            "excluded_status": dict(self.excluded_status),
        }

    def restore_state(self, state: dict[str, Any]) -> None:
        """Inverse of ``checkpoint_state``: epsilon keeps composing after a restart."""
        self.excluded = dict(state["excluded"])
        self.rounds_trained = dict(state["rounds_trained"])
        self.last_spend = json.loads(state["last_spend"])
        self.central_state = AccountantState.from_json(state["central_state"])
        self.site_states = {s: AccountantState.from_json(j)
                            for s, j in state["site_states"].items()}
        self.reported = json.loads(state.get("reported", "{}"))
        self.run_histories = {s: [(float(n), float(q), int(k)) for n, q, k in h]
                              for s, h in json.loads(state.get("run_histories", "{}")).items()}
        self.excluded_status = dict(state.get("excluded_status", {}))
        self.sites = sorted(set(self.sites) | set(self.site_states))

    def pop_ledger(self) -> list[dict[str, Any]]:
        """Ledger lines gathered since the last call (one per site per round)."""
        lines, self.pending = self.pending, []
        return lines

    # ----- training ----------------------------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample as the base strategy does, minus the sites whose budget is exhausted."""
        for node in grid.get_node_ids():
            self._site_of(node)
        eligible = self.eligible()
        if len(eligible) < self.min_sites:
            self._stop(server_round, f"{len(eligible)} site(s) with privacy budget left, fewer "
                       f"than privacy.budget.min_sites={self.min_sites}")
        self._eligible_at_start = set(eligible)
        self._round_arrays = arrays
        if self.central:
            nodes = len(list(grid.get_node_ids()))
            sampled = sample_size(self.base, nodes) / max(nodes, 1)
            self._round_q = sampled if self.secret_sample else 1.0
            self._round_clip = float(self.strategy.clipping_norm)  # type: ignore[attr-defined]
        messages = list(self.strategy.configure_train(server_round, arrays, config,
                                                      EntropySampledGrid(grid)))
        keep = []
        for msg in messages:
            site = self._site_of(msg.metadata.dst_node_id)
            if site in self.excluded:
                log(INFO, "privacy: not asking %s to train (%s)", site, self.excluded[site])
            else:
                keep.append(msg)
        self._sampled = {self._site_of(m.metadata.dst_node_id) for m in keep}
        if self.central and self.secret_sample:
            self._server_side_budget_check(server_round)
        return keep

    def _server_side_budget_check(self, server_round: int) -> None:
        # With a secret sample (q < 1) a site that is not sampled still has the round counted
        # (amplification covers its chance of having been sampled), so the server applies
        # the configured budget to it before the round: it cannot answer for itself.
        for site in sorted(self._eligible_at_start - self._sampled):
            projected = self.site_states[site].epsilon_after(
                float(self.noise_multiplier), self._round_q, 1
            )
            budget = site_budget(self.cfg, site)
            if budget.exceeded_by(projected):
                self.excluded[site] = (
                    f"budget exhausted before round {server_round}: epsilon would reach "
                    f"{projected:.4f} > {budget.epsilon} (server-side check)"
                )
                self.excluded_status[site] = STATUS_EXHAUSTED
                self._eligible_at_start.discard(site)
                log(WARNING, "privacy: %s excluded: %s", site, self.excluded[site])

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Keep exhausted sites out of the aggregate, account for the round, log its lines."""
        lines: dict[str, dict[str, Any]] = {}
        passed: list[Message] = []
        trained: list[str] = []
        replied: set[str] = set()
        for reply in replies:
            site = self._site_of(reply.metadata.src_node_id,
                                 None if reply.has_error() else reply.content)
            replied.add(site)
            if reply.has_error():
                lines[site] = self._line(site, server_round, STATUS_ERROR, 0)
                passed.append(reply)  # Flower's own handling of failed replies applies
                continue
            spend = read_spend(reply.content)
            if spend is None:
                lines[site] = self._line(site, server_round, STATUS_ERROR, 0)
                log(WARNING, "privacy: %s replied without a privacy report; its update is "
                    "dropped (is it running this ClientApp version?)", site)
                continue
            if spend["status"] in (STATUS_EXHAUSTED, STATUS_REFUSED):
                if not self.central and spend.get("noise_multiplier") is not None:
                    self.last_spend[site] = spend
                what = ("budget exhausted" if spend["status"] == STATUS_EXHAUSTED
                        else "refused by the site")
                self.excluded[site] = f"{what} in round {server_round}: " + str(
                    spend.get("reason", "")
                )
                self._eligible_at_start.discard(site)
                self.excluded_status[site] = spend["status"]
                log(WARNING, "privacy: %s stops training: %s", site, self.excluded[site])
                lines[site] = self._line(site, server_round, spend["status"], 0,
                                         reason=self.excluded[site])
                continue
            problem = self._check_reply(site, reply, spend)
            if problem is not None:
                self.excluded[site] = self.rejected[site] = (
                    f"reply rejected by the server in round {server_round}: {problem}")
                self._eligible_at_start.discard(site)
                self.excluded_status[site] = STATUS_REJECTED
                log(WARNING, "privacy: %s: %s", site, self.excluded[site])
                lines[site] = self._line(site, server_round, STATUS_REJECTED, 0,
                                         reason=self.excluded[site])
                continue
            if not self.central:
                self.last_spend[site] = spend
            self.rounds_trained[site] = self.rounds_trained.get(site, 0) + 1
            trained.append(site)
            passed.append(reply)
        for site in self._sampled - replied:
            lines[site] = self._line(site, server_round, STATUS_NO_REPLY, 0)

        if len(self.eligible()) < self.min_sites:
            for site in trained:  # a local-DP site that trained has released its update
                steps = 0 if self.central else int(self.last_spend[site]["steps"])
                lines[site] = self._line(site, server_round, STATUS_TRAINED, steps,
                                         reason="run stopped before aggregation")
            self._add_lines(server_round, lines, released=False)
            self._stop(server_round, f"{len(self.eligible())} site(s) with privacy budget "
                       f"left, fewer than privacy.budget.min_sites={self.min_sites}")

        if self.central:
            # the noise is calibrated to the number of updates actually averaged
            ok = sum(1 for r in passed if not r.has_error())
            calibrate_central_dp(self.strategy, ok)
            for reply in passed:  # equal weights set here, never read from a reply
                if not reply.has_error():
                    for record in reply.content.metric_records.values():
                        record[UNIFORM_WEIGHT_KEY] = 1
        arrays, metrics = self.strategy.aggregate_train(server_round, passed)
        released = self.central and arrays is not None
        if released:
            self.central_state.history = self._step(self.central_state)
            # published sample: only the sites whose update was averaged spend (q = 1);
            # secret sample: every site that could have been sampled spends (q < 1)
            spenders = self._eligible_at_start if self.secret_sample else set(trained)
            for site in spenders:
                self.site_states[site].history = self._step(self.site_states[site])
        for site in trained:
            steps = (1 if released else 0) if self.central else int(self.last_spend[site]["steps"])
            status = STATUS_IN_ROUND if self.central and self.secret_sample else STATUS_TRAINED
            lines[site] = self._line(site, server_round, status, steps)
        self._add_lines(server_round, lines, released)
        return arrays, metrics

    def _check_reply(self, site: str, reply: Message, spend: dict[str, Any]) -> str | None:
        """Why this reply cannot be trusted, or None (see the module docstring)."""
        if self.central:
            problem = self._check_norm(reply)
            if problem is None and spend.get("epsilon") is not None:
                reported = float(spend["epsilon"])
                before = self.reported.get(site, {}).get("epsilon", 0.0)
                if reported < before * (1 - EPSILON_TOLERANCE):
                    problem = f"reported epsilon {reported:.6g} is lower than before ({before:.6g})"
                else:
                    self.reported[site] = spend
            return problem
        try:
            history = [(float(n), float(q), int(k)) for n, q, k in spend["history"]]
            reported, delta = float(spend["epsilon"]), float(spend["delta"])
            this_round = (float(spend["noise_multiplier"]), float(spend["sample_rate"]),
                          int(spend["steps"]))
        except (KeyError, TypeError, ValueError):
            return "the privacy report lacks its history, epsilon or delta"
        recomputed = epsilon(history, delta, str(spend.get("accountant", self.accountant)))
        if not math.isclose(reported, recomputed, rel_tol=EPSILON_TOLERANCE, abs_tol=1e-9):
            return (f"reported epsilon {reported:.6g} disagrees with {recomputed:.6g} "
                    "recomputed from its history")
        before = float(self.reported.get(site, {}).get("epsilon", 0.0))
        if reported < before * (1 - EPSILON_TOLERANCE):
            return f"reported epsilon {reported:.6g} is lower than before ({before:.6g})"
        ours = add_steps(self.run_histories.get(site, []), *this_round)
        own_eps = epsilon(ours, delta, self.accountant)
        if reported < own_eps * (1 - EPSILON_TOLERANCE) or total_steps(history) < total_steps(
                ours):
            return (f"reported epsilon {reported:.6g} is below {own_eps:.6g}, what this run "
                    "alone has seen it release")
        self.run_histories[site] = ours
        self.reported[site] = spend
        return None

    def _check_norm(self, reply: Message) -> str | None:
        if not self.check_norms or self._round_arrays is None or self._round_clip is None:
            return None
        arrays = next(iter(reply.content.array_records.values()))
        try:
            norm = update_norm(arrays, self._round_arrays)
        except (ValueError, TypeError) as err:  # different keys/shapes: not this model's update
            return f"its update does not match the global model ({err})"
        if norm > self._round_clip * (1 + NORM_TOLERANCE):
            return (f"update norm {norm:.6g} is above the clipping norm {self._round_clip:.6g} "
                    "the server asked for (client-side clipping)")
        return None

    def _step(self, state: AccountantState) -> list[Step]:
        return add_steps(state.history, float(self.noise_multiplier), self._round_q, 1)

    def _add_lines(self, server_round: int, lines: dict[str, dict[str, Any]],
                   released: bool) -> None:
        for site in self.sites:
            if site in lines:
                line = lines[site]
            elif site in self.excluded:
                line = self._line(site, server_round, STATUS_EXCLUDED, 0,
                                  reason=self.excluded[site])
            else:
                secret = self.central and self.secret_sample
                stepped = secret and released and site in self._eligible_at_start
                line = self._line(site, server_round,
                                  STATUS_IN_ROUND if secret else STATUS_NOT_SAMPLED, int(stepped))
            if self.central:  # epsilon after this round's release (if any)
                line["epsilon"] = self.site_states[site].epsilon()
            self.pending.append(line)

    # ----- evaluation and reporting --------------------------------------------------------------

    # configure_evaluate / aggregate_evaluate are delegated: every site evaluates, exhausted
    # ones too (a site's test split is not its training data).

    def summary(self) -> None:
        """Log the privacy settings, then the wrapped strategy's summary."""
        log(INFO, "\t├──> Privacy: %s (accountant %s, delta %g, min sites %d)",
            self.mechanism, self.accountant, self.delta, self.min_sites)
        self.strategy.summary()

    def privacy_summary(self) -> dict[str, Any]:
        """Final (epsilon, delta) per site and, for central DP, of the mechanism."""
        per_site: dict[str, Any] = {}
        for site in self.sites:
            if self.central:
                eps = self.site_states[site].epsilon()
            else:
                eps = float(self.last_spend.get(site, {}).get("epsilon", 0.0))
            per_site[site] = {
                "epsilon": eps, "delta": self.delta,
                "rounds_trained": self.rounds_trained.get(site, 0),
                "status": self.excluded_status.get(site, "active"),
                "budget_epsilon": site_budget(self.cfg, site).epsilon,
            }
            if site in self.excluded:
                per_site[site]["reason"] = self.excluded[site]
        out: dict[str, Any] = {
            "name": self.cfg.privacy.name, "mechanism": self.mechanism,
            "accountant": self.accountant, "delta": self.delta, "per_site": per_site,
            "central": None, "stopped_early": self.stop_reason,
        }
        if self.central:
            out["central"] = {
                "epsilon": self.central_state.epsilon(), "delta": self.delta,
                "noise_multiplier": self.noise_multiplier,
                "releases": sum(int(s[2]) for s in self.central_state.history),
                "history": [list(s) for s in self.central_state.history],
                "clipping": self.cfg.privacy.clipping,
                "adaptive": self.cfg.privacy.adaptive,
                "final_clipping_norm": float(self.strategy.clipping_norm),  # type: ignore[attr-defined]
            }
        return out
