"""Contribution scores: what each hospital's updates add to the final model's quality.

``contribution=loo|shapley`` (conf/contribution/). No data leaves a hospital:

1. ``UpdateRecorder``, the innermost wrapper of the strategy chain (it sees exactly the
   replies the aggregator averages: after update validation, before any secure-aggregation
   sum, which is refused), adds up each hospital's updates over the rounds:
   ``A_i = sum_t (w_i^t - G_{t-1})``, with its FedAvg weight ``n_i`` (num-examples).
2. After training, the model of a coalition S of hospitals is rebuilt as
   ``M(S) = G_0 + sum_{i in S} n_i A_i / sum_{i in S} n_i`` (``G_0``: the model the run started
   from; ``M({}) = G_0``). For FedAvg/FedProx with every hospital in every round's aggregate,
   ``M(all)`` IS the final model (``G_T = G_0 + sum_t sum_i n_i/N (w_i^t - G_{t-1})``);
   summary.json ``reconstruction_error`` says how far it is from the final model otherwise
   (robust aggregators, FedAdam, partial participation).
3. The coalition models go to every hospital in evaluate messages (fl_app/after_training.py,
   through the FederationGuard, so the audit trail records the exchange); each evaluates them
   on its OWN validation split and replies only metrics, which the server pools into the
   utility ``U(S)`` (``utility``: pooled validation AUC, accuracy or minus the loss).
4. Scores: leave-one-out ``U(all) - U(all minus i)``; Shapley exactly over all ``2^n``
   coalitions for ``n <= exact_max_sites``, else a Monte-Carlo estimate over permutations
   (GTG-Shapley style: each hospital leads equally many permutations; optionally a
   permutation is truncated once its coalition's utility is within ``truncation * |gain|``
   of ``U(all)``, which biases a harmful hospital's score towards 0, so it is off by
   default), sampled in batches until every hospital's standard error is
   ``<= target_error``.

Why the updates accumulated over all rounds rather than the last round's: the score is about
the final model, and the last round only moves an already converged model a little (its gain
is mostly evaluation noise). The reconstruction's gain ``U(all) - U(G_0)`` is everything the
federation built, and the Shapley values share it out exactly (efficiency). It costs one
evaluation stage after training and nothing per training round. Like every
reconstruction-based estimator (Song et al. 2019's "one-round reconstruction",
GTG-Shapley's rebuilt sub-models), ``M(S)`` approximates, rather than retrains, a federation
of S alone: S's updates were computed from models that the others helped to build.

What a hospital learns: every coalition's model, singletons included, i.e. each other
hospital's accumulated model. A consortium that must not share that keeps contribution=none.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from omegaconf import DictConfig

from fl_app.errors import ConfigError
from strategies.budget import mechanism
from strategies.wrapper import StrategyWrapper, find

NONE = "none"
METHODS = (NONE, "loo", "shapley")
UTILITIES = ("auc", "accuracy", "neg_loss")

Coalition = frozenset[str]
# evaluates coalitions (a batch of them, once each) -> utility of each
ValueFn = Callable[[list[Coalition]], dict[Coalition, float]]


class ContributionConfigError(ConfigError):
    """A contribution setting (or combination) that cannot be used."""


def method(cfg: DictConfig) -> str:
    """``contribution.name`` (``none`` when the config has no contribution group)."""
    node = cfg.get("contribution")
    return NONE if node is None else str(node.get("name", NONE))


def enabled(cfg: DictConfig) -> bool:
    """Whether contribution scores are asked for."""
    return method(cfg) != NONE


def check(cfg: DictConfig) -> None:
    """One clear line for a contribution setting that cannot work (before any training).

    Secure aggregation is refused in strategies/secure_aggregation.py (REFUSALS)."""
    name = method(cfg)
    if name not in METHODS:
        raise ContributionConfigError(
            f"contribution must be one of {', '.join(METHODS)}, got '{name}'")
    if name == NONE:
        return
    c = cfg.contribution
    if str(c.utility) not in UTILITIES:
        raise ContributionConfigError(
            f"contribution.utility must be one of {', '.join(UTILITIES)}, got '{c.utility}'")
    if int(c.max_models_per_message) < 1:
        raise ContributionConfigError("contribution.max_models_per_message must be >= 1")
    if mechanism(cfg) == "central_dp":
        raise ContributionConfigError(
            f"contribution={name} cannot be combined with privacy={cfg.privacy.name}: the "
            "coalition models would be sent to the hospitals without central DP's noise, "
            "releasing what the noise protects; use privacy=local_dp or none")
    if cfg.get("fedbn", False):
        raise ContributionConfigError(
            f"contribution={name} cannot be combined with fedbn=true: the sites' own "
            "normalisation layers are not in their updates, so no coalition model has them")
    val_fraction = cfg.task.get("val_fraction")
    if val_fraction is not None and float(val_fraction) <= 0:
        raise ContributionConfigError(
            f"contribution={name} scores the coalition models on each hospital's validation "
            f"split, and task.val_fraction={val_fraction} gives {cfg.task.name} none: set "
            "task.val_fraction (e.g. 0.2, carved from each hospital's training share)")
    if name == "shapley":
        if int(c.max_permutations) < 1 or int(c.permutations_per_batch) < 1:
            raise ContributionConfigError(
                "contribution.max_permutations and permutations_per_batch must be >= 1")
        if not 0 <= float(c.truncation) < 1:
            raise ContributionConfigError("contribution.truncation must be in [0, 1)")


# ----- server: the hospitals' updates, accumulated over the rounds ------------------------


def _floating(array: np.ndarray) -> bool:
    return np.issubdtype(array.dtype, np.floating)


class UpdateRecorder(StrategyWrapper):
    """Innermost wrapper: adds up each hospital's updates of every aggregated round.

    ``site_of(reply_content)`` names a reply's hospital; ``weight_key`` is the aggregator's
    weight (num-examples).
    """

    def __init__(self, strategy: Strategy, weight_key: str,
                 site_of: Callable[[Any], str]) -> None:
        super().__init__(strategy)
        self.weight_key = weight_key
        self.site_of = site_of
        self.initial: dict[str, np.ndarray] | None = None  # G_0 (float64 for float arrays)
        self.final: dict[str, np.ndarray] | None = None  # the latest aggregate
        self.first_round: int | None = None
        self.last_round: int | None = None
        self.accumulated: dict[str, dict[str, np.ndarray]] = {}  # site -> key -> A_i
        self.weights: dict[str, float] = {}
        self.rounds: dict[str, int] = {}  # site -> aggregated rounds it took part in
        self.round_sites: dict[int, list[str]] = {}
        self._global: dict[str, np.ndarray] | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the round's global model (the base of its updates)."""
        self._global = {k: v.numpy() for k, v in arrays.items()}
        if self.initial is None:
            self.initial = {k: v.astype(np.float64) if _floating(v) else v.copy()
                            for k, v in self._global.items()}
            self.first_round = server_round
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate as usual; when the round has an aggregate, add its updates up."""
        replies = list(replies)
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if arrays is None or self._global is None:
            return arrays, metrics
        taken = []
        for reply in replies:
            if reply.has_error() or "arrays" not in reply.content.array_records:
                continue
            site = self.site_of(reply.content)
            sent = reply.content["arrays"]
            acc = self.accumulated.setdefault(site, {})
            for key, base in self._global.items():
                if not _floating(base) or key not in sent:
                    continue
                update = sent[key].numpy().astype(np.float64) - base
                acc[key] = acc[key] + update if key in acc else update
            self.weights[site] = float(reply.content["metrics"][self.weight_key])
            self.rounds[site] = self.rounds.get(site, 0) + 1
            taken.append(site)
        self.round_sites[server_round] = sorted(taken)
        self.final = {k: v.numpy() for k, v in arrays.items()}
        self.last_round = server_round
        return arrays, metrics

    @property
    def sites(self) -> list[str]:
        """The hospitals with at least one aggregated update."""
        return sorted(self.accumulated)

    def coalition_arrays(self, coalition: Iterable[str]) -> ArrayRecord:
        """``M(S)``: the initial model plus the weighted mean of S's accumulated updates
        (non-float entries, e.g. BatchNorm's batch counter, as in the final model)."""
        if self.initial is None or self.final is None:
            raise ValueError("no aggregated round was recorded")
        members = sorted(coalition)
        total = sum(self.weights[s] for s in members)
        out = {}
        for key, base in self.initial.items():
            dtype = self.final[key].dtype
            if not _floating(base):
                out[key] = Array(np.array(self.final[key], copy=True))
                continue
            value = base.copy()
            for site in members:
                if key in self.accumulated[site]:
                    value += self.weights[site] / total * self.accumulated[site][key]
            out[key] = Array(value.astype(dtype))
        return ArrayRecord(out)

    def reconstruction_error(self) -> float:
        """Largest absolute difference between ``M(all)`` and the final aggregate."""
        if self.final is None:
            return math.nan
        full = self.coalition_arrays(self.sites)
        return float(max((np.abs(full[k].numpy().astype(np.float64) - v).max()
                          for k, v in self.final.items() if _floating(v) and v.size),
                         default=0.0))


def wrap(strategy: Strategy, cfg: DictConfig, weight_key: str,
         site_of: Callable[[Any], str]) -> Strategy:
    """``strategy`` wrapped in an ``UpdateRecorder`` when contribution scores are asked for."""
    check(cfg)
    return UpdateRecorder(strategy, weight_key, site_of) if enabled(cfg) else strategy


def recorder_of(strategy: Strategy) -> UpdateRecorder | None:
    """The run's UpdateRecorder (None when contribution is off)."""
    return find(strategy, UpdateRecorder)


# ----- scores from a value function (pure: tests use synthetic games) ----------------------


@dataclass
class Scores:
    """What a scoring method found."""

    scores: dict[str, float]
    full: float  # U(all)
    empty: float  # U({}) = the initial model's utility
    standard_error: dict[str, float]
    values: dict[Coalition, float] = field(default_factory=dict)  # every evaluated coalition
    estimator: str = "exact"
    permutations: int = 0
    truncation_tolerance: float = 0.0  # Monte-Carlo: truncation x |gain|

    @property
    def gain(self) -> float:
        """The grand coalition's gain U(all) - U({})."""
        return self.full - self.empty

    @property
    def error(self) -> float:
        """The stated error of each score: 0 for exact methods; for Monte-Carlo, 2 x the
        largest standard error (a ~95% half-width)."""
        return 2.0 * max(self.standard_error.values(), default=0.0)

    @property
    def efficiency_bound(self) -> float:
        """Most the scores' sum can differ from the gain: 0 when exact (up to rounding) and
        for untruncated permutations (each one's marginals telescope to the gain); with
        truncation, the tolerance a permutation may stop within."""
        return self.truncation_tolerance


def leave_one_out(players: list[str], value: ValueFn) -> Scores:
    """``U(all) - U(all minus i)`` for each player (n + 2 evaluations)."""
    full, empty = frozenset(players), frozenset()
    without = {p: full - {p} for p in players}
    values = value([empty, full, *without.values()])
    return Scores({p: values[full] - values[without[p]] for p in players}, values[full],
                  values[empty], dict.fromkeys(players, 0.0), values, "exact")


def exact_shapley(players: list[str], value: ValueFn) -> Scores:
    """Shapley values over all ``2^n`` coalitions."""
    n = len(players)
    coalitions = [frozenset(c) for k in range(n + 1) for c in combinations(players, k)]
    values = value(coalitions)
    scores = {}
    for p in players:
        others = [q for q in players if q != p]
        total = 0.0
        for k in range(n):
            weight = math.factorial(k) * math.factorial(n - k - 1) / math.factorial(n)
            for c in combinations(others, k):
                s = frozenset(c)
                total += weight * (values[s | {p}] - values[s])
        scores[p] = total
    full, empty = frozenset(players), frozenset()
    return Scores(scores, values[full], values[empty], dict.fromkeys(players, 0.0), values,
                  "exact")


def monte_carlo_shapley(players: list[str], value: ValueFn, *, seed: int,
                        max_permutations: int, batch: int, target_error: float,
                        truncation: float) -> Scores:
    """Permutation-sampling Shapley estimate with its standard errors (GTG-Shapley style).

    Permutations come in batches; permutation k is led by player ``k mod n`` (every player
    leads equally often), the rest in random order. Within a batch the coalitions are
    evaluated prefix length by prefix length (one ``value`` call each), so a permutation
    whose prefix is already within ``truncation * |gain|`` of ``U(all)`` stops there (its
    later marginals count 0). Sampling stops once every player's standard error is
    ``<= target_error`` (after at least 2 permutations per player) or at
    ``max_permutations``.
    """
    rng = np.random.default_rng(seed)
    n = len(players)
    full, empty = frozenset(players), frozenset()
    cache = dict(value([empty, full]))
    tolerance = truncation * abs(cache[full] - cache[empty])
    samples: dict[str, list[float]] = {p: [] for p in players}
    done = 0
    while done < max_permutations:
        perms = []
        for _ in range(min(batch, max_permutations - done)):
            lead = players[done % n]
            rest = [players[i] for i in rng.permutation(n) if players[i] != lead]
            perms.append([lead, *rest])
            done += 1
        marginal = [dict.fromkeys(players, 0.0) for _ in perms]
        previous = [cache[empty]] * len(perms)
        alive = list(range(len(perms)))
        for position in range(n):
            prefixes = {j: frozenset(perms[j][:position + 1]) for j in alive}
            new = sorted({c for c in prefixes.values() if c not in cache}, key=sorted)
            if new:
                cache.update(value(new))
            for j in list(alive):
                utility = cache[prefixes[j]]
                marginal[j][perms[j][position]] = utility - previous[j]
                previous[j] = utility
                if tolerance > 0 and abs(cache[full] - utility) <= tolerance:
                    alive.remove(j)  # truncated: the rest of this permutation adds ~0
        for m in marginal:
            for p in players:
                samples[p].append(m[p])
        errors = _standard_errors(samples)
        if done >= 2 * n and max(errors.values()) <= target_error:
            break
    found = Scores({p: float(np.mean(v)) for p, v in samples.items()}, cache[full],
                   cache[empty], _standard_errors(samples), cache, "monte_carlo", done)
    found.truncation_tolerance = tolerance
    return found


def _standard_errors(samples: dict[str, list[float]]) -> dict[str, float]:
    return {p: float(np.std(v, ddof=1) / math.sqrt(len(v))) if len(v) > 1 else math.inf
            for p, v in samples.items()}


def score(cfg: DictConfig, players: list[str], value: ValueFn) -> Scores:
    """The scores ``contribution`` asks for."""
    c = cfg.contribution
    if method(cfg) == "loo":
        return leave_one_out(players, value)
    if len(players) <= int(c.exact_max_sites):
        return exact_shapley(players, value)
    return monte_carlo_shapley(
        players, value, seed=int(cfg.seed), max_permutations=int(c.max_permutations),
        batch=int(c.permutations_per_batch), target_error=float(c.target_error),
        truncation=float(c.truncation))


def planned_evaluations(cfg: DictConfig, num_sites: int) -> str:
    """The cost, in coalition models each hospital evaluates after training (for the log)."""
    if method(cfg) == "loo":
        return f"{num_sites + 2} coalition models (leave-one-out)"
    if num_sites <= int(cfg.contribution.exact_max_sites):
        return f"{2 ** num_sites} coalition models (exact Shapley)"
    return (f"at most {int(cfg.contribution.max_permutations) * (num_sites - 1) + 2} "
            "coalition models (Monte-Carlo Shapley)")


def summary(cfg: DictConfig, found: Scores, recorder: UpdateRecorder) -> dict[str, Any]:
    """summary.json ``contribution``."""
    loo = None
    full = frozenset(found.scores)
    if all(full - {p} in found.values for p in found.scores):
        loo = {p: found.full - found.values[full - {p}] for p in found.scores}
    out: dict[str, Any] = {
        "method": method(cfg),
        "utility": str(cfg.contribution.utility),
        "split": "val",
        "scores": found.scores,
        "grand_coalition_gain": found.gain,
        "utility_full": found.full,
        "utility_initial": found.empty,
        "sum_of_scores": float(sum(found.scores.values())),
        "error": found.error,
        "efficiency_bound": found.efficiency_bound,
        "standard_error": found.standard_error,
        "estimator": found.estimator,
        "evaluations": len(found.values),
        "permutations": found.permutations,
        "leave_one_out": loo,
        "updates": "accumulated over rounds",
        "rounds": [recorder.first_round, recorder.last_round],
        "rounds_per_site": dict(recorder.rounds),
        "reconstruction_error": recorder.reconstruction_error(),
    }
    if len(found.values) <= 64:  # small enough to print: every coalition's utility
        out["coalitions"] = {"+".join(sorted(c)) or "{}": v
                             for c, v in sorted(found.values.items(),
                                                key=lambda kv: (len(kv[0]), sorted(kv[0])))}
    return out
