"""What every secure-aggregation option shares: config checks, dispatch, and the sum.

Under secure aggregation (``secagg=secaggplus``, ``secagg=ckks``) the server learns only the
SUM of the hospitals' weighted model updates. This module holds the parts every option uses:

- ``check_secure_aggregation(cfg)``: refuses, with one line each, the combinations that need
  single updates (table ``REFUSALS``; adding one = one line) and the option's own parameters.
- ``option(name)``: the dispatch from an option name to its server wrapper and client mod
  (modules listed in ``OPTIONS``, imported only when chosen).
- ``SecureAggregation``: the server wrapper base class an option subclasses. It remembers
  the round's global model and Grid, lets the option run its extra stages around the train
  message (``setup_round`` before it, ``secure_sum`` after it), and hands the inner strategy
  what it would have aggregated without secure aggregation (``replies_from_sum``).
- ``replies_from_sum``: THE shared step from an unmasked/decrypted sum to the inner strategy.
  Every reply whose update is in the sum gets the weighted average ``global + S / W``
  (S = sum of weight_i * update_i, W = sum of weight_i) as its arrays and keeps its own
  metrics and records. FedAvg's weighted mean of identical arrays is that array, so FedAvg,
  FedProx and FedAdam (Adam on FedAvg's result) aggregate exactly what they would have
  without secure aggregation; the central-DP wrappers add noise z*C/m once, to that average,
  with m = the number of replies in the sum (the privacy guard counts the replies it passes);
  per-site metrics and privacy reports still arrive per site.
- Client side: ``weighted_update`` (the vector a hospital protects: weight x (its model -
  global model), flattened, and the weight) and ``secure_aggregation_mod`` (the train-handler
  mod that hands a message to the option named in it).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import ERROR, INFO
from typing import Any, ClassVar

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy
from omegaconf import DictConfig

from fl_app.errors import ConfigError
from fl_app.federation_guard import SiteFailure
from strategies.budget import STATUS_EXHAUSTED, mechanism, read_spend
from strategies.wrapper import StrategyWrapper, innermost

NONE = "none"
# option name -> module defining ``OPTION`` (a SecureAggregationOption); imported when chosen
OPTIONS: dict[str, str] = {
    "secaggplus": "strategies.secaggplus",
    "ckks": "strategies.ckks",
}
# ConfigRecord that every message of a secure-aggregation round carries (server -> site and
# back): ``option`` (the option's name) plus the option's own fields.
SECAGG_RECORD = "secagg"
OPTION_KEY = "option"
WEIGHT_KEY_FIELD = "weight-key"  # the MetricRecord key the inner strategy weights by
KEYS_FIELD = "keys"  # a site's reply: the model keys (in order) of its protected vector
ARRAYS = "arrays"

# Aggregators that look at single updates (issue 9 adds them to conf/strategy/); q-FedAvg
# weighs each update by its own site's training loss.
SINGLE_UPDATE_STRATEGIES = (
    "median", "fedmedian", "trimmed_mean", "fedtrimmedavg", "krum", "multikrum", "bulyan",
    "qfedavg",
)


class SecureAggregationConfigError(ConfigError):
    """A secure-aggregation setting (or combination) that cannot be used."""


class SecureAggregationFailure(SiteFailure):
    """A round whose sum could not be computed (e.g. too few hospitals left)."""


def _enabled(value: Any) -> bool:
    """Whether an optional feature's config value switches it on (None/false/'none' = off)."""
    if isinstance(value, (DictConfig, dict)):
        value = value.get("name", value.get("enabled", True))
    return value not in (None, False, "none", "off", "", 0)


@dataclass(frozen=True)
class Refusal:
    """A setting that needs single updates: ``key`` (shown) is refused when ``applies``."""

    key: str
    applies: Callable[[DictConfig], bool]
    why: str


# One line per combination that needs what secure aggregation hides (a single update).
REFUSALS: tuple[Refusal, ...] = (
    Refusal("privacy.clipping",
            lambda c: mechanism(c) == "central_dp" and str(c.privacy.get("clipping")) == "server",
            "server-side clipping needs each hospital's own update; use "
            "privacy=central_dp_client (each hospital clips its update before it is protected)"),
    Refusal("strategy", lambda c: str(c.strategy.name) in SINGLE_UPDATE_STRATEGIES,
            "median/trimmed-mean/Krum-type aggregators and q-FedAvg use single updates (q-FedAvg "
            "weighs each by its site's loss), which the server no longer sees; use "
            "strategy=fedavg, fedprox or fedadam"),
    Refusal("contribution", lambda c: _enabled(c.get("contribution")),
            "contribution scores need each hospital's own update; set contribution to none"),
    Refusal("compression", lambda c: _enabled(c.get("compression")),
            "masked SecAgg+ vectors and CKKS ciphertexts cannot be compressed without breaking "
            "the protocol; set compression=none"),
)


def secagg_name(cfg: DictConfig) -> str:
    """The secure-aggregation option of an experiment config (``none`` when absent)."""
    node = cfg.get("secagg", None)
    return NONE if node is None else str(node.get("name", NONE))


@dataclass(frozen=True)
class SecureAggregationOption:
    """One secure-aggregation option: its server wrapper and its client mod.

    ``wrap(strategy, cfg)`` returns the server wrapper (a ``SecureAggregation``) around the
    fully wrapped strategy; ``client_mod`` is the option's half on the train handler (it
    receives only messages that carry the option's ``SECAGG_RECORD``); ``check(cfg)``
    validates the option's own ``cfg.secagg`` parameters (raise
    ``SecureAggregationConfigError`` with one line).
    """

    name: str
    wrap: Callable[[Strategy, DictConfig], Strategy]
    client_mod: Mod
    check: Callable[[DictConfig], None] = field(default=lambda cfg: None)


def option(name: str) -> SecureAggregationOption:
    """The option called ``name`` (its module is imported now)."""
    if name not in OPTIONS:
        raise SecureAggregationConfigError(
            f"secagg.name must be one of {', '.join([NONE, *OPTIONS])}, got '{name}'"
        )
    try:
        module = importlib.import_module(OPTIONS[name])
    except ModuleNotFoundError as err:
        raise SecureAggregationConfigError(f"secagg={name} is not built ({err})") from None
    return module.OPTION  # type: ignore[no-any-return]


def check_secure_aggregation(cfg: DictConfig) -> str:
    """Validate the secure-aggregation part of ``cfg``; return the option name."""
    name = secagg_name(cfg)
    if name == NONE:
        return name
    for refusal in REFUSALS:
        if refusal.applies(cfg):
            from omegaconf import OmegaConf

            value = OmegaConf.select(cfg, refusal.key, default=None)
            shown = value.get("name", value) if isinstance(value, DictConfig) else value
            raise SecureAggregationConfigError(
                f"secagg={name} cannot be combined with {refusal.key}={shown}: {refusal.why}"
            )
    option(name).check(cfg)
    return name


def wrap_secure_aggregation(strategy: Strategy, cfg: DictConfig) -> Strategy:
    """``strategy`` wrapped by the option ``cfg.secagg`` asks for (unchanged for ``none``)."""
    name = check_secure_aggregation(cfg)
    return strategy if name == NONE else option(name).wrap(strategy, cfg)


def weight_key_of(strategy: Strategy) -> str:
    """The MetricRecord key the base aggregator weights replies by."""
    base = innermost(strategy)
    return str(base.weighted_by_key) if isinstance(base, FedAvg) else "num-examples"


# ----- the sum -> what the inner strategy aggregates ---------------------------------------------


@dataclass
class SecureSum:
    """What an option hands back after the round: the sum and whose updates are in it.

    ``update_sum`` maps each model key the sites sent (FedBN: its site-local layers are not
    among them) to sum_i weight_i * (model_i - global) (float64); ``weight_sum`` is
    sum_i weight_i; ``node_ids`` are the nodes whose updates are in the sum.
    """

    node_ids: list[int]
    update_sum: dict[str, np.ndarray]
    weight_sum: float


def average_arrays(secure_sum: SecureSum, global_arrays: ArrayRecord) -> ArrayRecord:
    """The weighted average of the sites' models: ``global + S / W`` per key sent.

    Floating-point entries keep the global model's dtype; integer entries (e.g. BatchNorm's
    ``num_batches_tracked``) become float64, as in FedAvg's own weighted mean.
    """
    if secure_sum.weight_sum <= 0:
        raise SecureAggregationFailure("the summed weight is not positive; nothing to average")
    out: dict[str, Array] = {}
    for key, total in secure_sum.update_sum.items():
        base = global_arrays[key].numpy()
        mean = base.astype(np.float64) + np.asarray(total, np.float64).reshape(base.shape) / (
            secure_sum.weight_sum
        )
        dtype = base.dtype if np.issubdtype(base.dtype, np.floating) else np.float64
        out[key] = Array(np.ascontiguousarray(mean.astype(dtype)))
    return ArrayRecord(out)


def replies_from_sum(
    replies: Iterable[Message], secure_sum: SecureSum, global_arrays: ArrayRecord
) -> list[Message]:
    """The replies the inner strategy aggregates, built from an unmasked/decrypted sum.

    Each reply whose node is in ``secure_sum.node_ids`` gets ``arrays`` = the weighted
    average (``average_arrays``) and keeps its metrics and other records (the option's
    ``SECAGG_RECORD`` and protected arrays are dropped). Error replies and replies without an
    update (e.g. a site whose privacy budget is exhausted) are passed on unchanged, so the
    wrappers inside (privacy guard, Flower's DP wrapper) see them as before.
    """
    average = average_arrays(secure_sum, global_arrays)
    in_sum = set(secure_sum.node_ids)
    out: list[Message] = []
    for reply in replies:
        if reply.has_error():
            out.append(reply)
            continue
        content = RecordDict({
            name: record for name, record in reply.content.items()
            if name != SECAGG_RECORD and not isinstance(record, ArrayRecord)
        })
        if reply.metadata.src_node_id in in_sum:
            content[ARRAYS] = ArrayRecord(dict(average.items()))
        reply.content = content
        out.append(reply)
    return out


def check_weights(secure_sum: SecureSum, replies: list[Message], weight_key: str) -> None:
    """The summed weight must equal the weights the sites reported in their metrics.

    The server cannot see a site's weight inside the sum, but it sees the sum of weights:
    a site that protected a different weight than it reported (e.g. 1000 instead of central
    DP's 1, to dominate the average) makes them differ, and the round is refused.
    """
    nodes = set(secure_sum.node_ids)
    reported = sum(reply_weight(r, weight_key) for r in replies
                   if not r.has_error() and r.metadata.src_node_id in nodes)
    if abs(reported - secure_sum.weight_sum) > 1e-6 * max(1.0, abs(reported)):
        raise SecureAggregationFailure(
            f"the summed weight {secure_sum.weight_sum:g} differs from the '{weight_key}' the "
            f"sites reported ({reported:g}): a site protected another weight than it reported"
        )


# ----- the server wrapper base ------------------------------------------------------------------


class SecureAggregation(StrategyWrapper):
    """Base server wrapper of a secure-aggregation option (outermost in the chain).

    Subclasses implement ``setup_round`` (stages before the train message; returns the train
    messages to send, each carrying ``SECAGG_RECORD``) and ``secure_sum`` (stages after it;
    returns the ``SecureSum`` or raises ``SecureAggregationFailure``). Both may use the Grid
    (the run's FederationGuard: failed sites are logged and counted, ``on_site_failure``
    applies). Everything else (global model, weight key, the inner strategy's replies,
    ``on_site_failure`` when the sum fails) is handled here.
    """

    name: ClassVar[str] = "base"

    def __init__(self, strategy: Strategy, cfg: DictConfig) -> None:
        super().__init__(strategy)
        self.cfg = cfg
        self.weight_key = weight_key_of(strategy)
        self.policy = str(cfg.get("on_site_failure", "continue"))
        self.round_timeout = float(cfg.get("round_timeout_s", 3600))
        self.grid: Grid | None = None
        self.global_arrays: ArrayRecord | None = None
        self.failed_rounds: dict[int, str] = {}  # round -> why the sum failed
        self.aggregated_nodes: list[int] = []  # nodes in the latest round's sum
        self._setup_failure: SecureAggregationFailure | None = None

    # --- option hooks ----------------------------------------------------------------------
    def setup_round(
        self, server_round: int, messages: list[Message], grid: Grid
    ) -> list[Message]:
        """Run the stages before the train message; return the train messages to send."""
        raise NotImplementedError

    def secure_sum(self, server_round: int, replies: list[Message], grid: Grid) -> SecureSum:
        """Run the stages after the train message; return the sum of the round."""
        raise NotImplementedError

    # --- helpers for options ---------------------------------------------------------------
    def record(self, **fields: Any) -> ConfigRecord:
        """A ``SECAGG_RECORD`` naming this option, plus ``fields``."""
        return ConfigRecord({OPTION_KEY: self.name, WEIGHT_KEY_FIELD: self.weight_key, **fields})

    def stage_message(self, node_id: int, server_round: int, **fields: Any) -> Message:
        """A train-type message for an extra stage (no model, no training)."""
        content = RecordDict({
            SECAGG_RECORD: self.record(**fields),
            "config": ConfigRecord({"server-round": server_round}),
        })
        return Message(content=content, dst_node_id=node_id, message_type=MessageType.TRAIN)

    @staticmethod
    def with_record(msg: Message, record: ConfigRecord) -> Message:
        """A copy of a train message with ``record`` as its ``SECAGG_RECORD`` (Flower's
        strategies share one content object between all messages of a round)."""
        content = RecordDict({**dict(msg.content.items()), SECAGG_RECORD: record})
        return Message(content=content, dst_node_id=msg.metadata.dst_node_id,
                       message_type=msg.metadata.message_type, group_id=msg.metadata.group_id)

    # --- Strategy --------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample as the inner strategy does, then run the option's stages before training."""
        self.grid, self.global_arrays = grid, arrays
        self.aggregated_nodes, self._setup_failure = [], None
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        if not messages:
            return messages
        try:
            return self.setup_round(server_round, messages, grid)
        except SecureAggregationFailure as err:  # handled in aggregate_train (no training)
            self._setup_failure = err
            return []

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Compute the secure sum, then let the inner strategy aggregate its average."""
        replies = list(replies)
        assert self.grid is not None and self.global_arrays is not None
        try:
            if self._setup_failure is not None:
                raise self._setup_failure
            secure_sum = self.secure_sum(server_round, replies, self.grid)
            check_weights(secure_sum, replies, self.weight_key)
        except SecureAggregationFailure as err:
            why = f"round {server_round}: secure aggregation ({self.name}) failed: {err}"
            self.failed_rounds[server_round] = why
            if self.policy == "stop":
                raise SecureAggregationFailure(
                    f"{why}; on_site_failure=stop ends the run"
                ) from None
            log(ERROR, "fedclinic: %s; no aggregate this round (the global model is "
                "unchanged), on_site_failure=continue goes on with the connected sites", why)
            return None, None
        self.aggregated_nodes = list(secure_sum.node_ids)
        log(INFO, "secure aggregation (%s): round %d sum of %d site(s) unmasked",
            self.name, server_round, len(secure_sum.node_ids))
        inner = replies_from_sum(replies, secure_sum, self.global_arrays)
        return self.strategy.aggregate_train(server_round, inner)


# ----- client side ------------------------------------------------------------------------------


def secagg_record_of(msg: Message) -> ConfigRecord | None:
    """The ``SECAGG_RECORD`` of a message, or None."""
    if not msg.has_content():
        return None
    record = msg.content.config_records.get(SECAGG_RECORD)
    return record if isinstance(record, ConfigRecord) else None


def secure_aggregation_mod(msg: Message, context: Context, call_next: ClientAppCallable
                           ) -> Message:
    """Train-handler mod: hand messages of a secure-aggregation round to their option.

    Outermost of the train mods, so what the option protects is the update the other mods
    produced (clipped by central DP, without FedBN's site-local layers). Messages without a
    ``SECAGG_RECORD`` (``secagg=none``) pass through unchanged.
    """
    record = secagg_record_of(msg)
    if msg.metadata.message_type != MessageType.TRAIN or record is None:
        return call_next(msg, context)

    def inner(message: Message, ctx: Context) -> Message:
        # the inner mods and the handler get the train message as without secure
        # aggregation (Flower's clipping mods expect exactly one ConfigRecord)
        if SECAGG_RECORD in message.content:
            del message.content[SECAGG_RECORD]
        return call_next(message, ctx)

    return option(str(record[OPTION_KEY])).client_mod(msg, context, inner)


def has_update(reply: Message) -> bool:
    """Whether a site's train reply carries an update to protect.

    Not when it is an error, carries no arrays, or is a privacy-budget refusal (such a site
    returns the global model unchanged; it must not count in the sum, where its weight would
    dilute the others'). The reply then goes back unprotected and the site is treated as a
    dropout of the round.
    """
    if reply.has_error() or ARRAYS not in reply.content.array_records:
        return False
    spend = read_spend(reply.content)
    return spend is None or spend.get("status") != STATUS_EXHAUSTED


def weighted_update(
    global_arrays: ArrayRecord, trained: ArrayRecord, weight: float
) -> tuple[list[str], np.ndarray]:
    """The vector a site protects: ``weight * (trained - global)`` over the keys it sends.

    Returns the keys (in the reply's order; FedBN leaves its site-local layers out) and one
    flat float64 vector (keys concatenated in that order).
    """
    keys = list(trained.keys())
    parts = [
        (trained[k].numpy().astype(np.float64) - global_arrays[k].numpy().astype(np.float64))
        .ravel() for k in keys
    ]
    vector = np.concatenate(parts) if parts else np.zeros(0)
    return keys, weight * vector


def split_vector(vector: np.ndarray, keys: list[str], global_arrays: ArrayRecord
                 ) -> dict[str, np.ndarray]:
    """Cut a flat vector back into per-key arrays shaped like the global model's."""
    out: dict[str, np.ndarray] = {}
    start = 0
    for key in keys:
        shape = global_arrays[key].numpy().shape
        size = int(np.prod(shape))
        out[key] = vector[start:start + size].reshape(shape)
        start += size
    if start != vector.size:
        raise SecureAggregationFailure(
            f"the summed vector has {vector.size} entries, the model keys need {start}"
        )
    return out


def reply_weight(reply: Message, weight_key: str) -> float:
    """The weight a site's train reply carries under ``weight_key`` (its MetricRecord)."""
    for record in reply.content.metric_records.values():
        if weight_key in record:
            return float(record[weight_key])  # type: ignore[arg-type]
    raise KeyError(f"the train reply has no metric '{weight_key}' to weight its update by")
