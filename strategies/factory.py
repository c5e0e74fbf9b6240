"""Build the Flower strategy an experiment config asks for.

The base aggregator is one of Flower's own Message-API strategies (FedAvg, FedProx, FedAdam,
q-FedAvg, or a robust one: FedMedian, FedTrimmedAvg, Krum, MultiKrum, Bulyan; strategies/robust.py),
weighted by the number of training examples each site reports as ``num-examples``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import strategy as flwr_strategy
from flwr.serverapp.strategy import FedAvg, FedProx, Strategy
from omegaconf import DictConfig

from strategies import contribution
from strategies.budget import UNIFORM_WEIGHT_KEY, mechanism
from strategies.compression import with_compression
from strategies.fedbn import FedBN
from strategies.fedbn import enabled as fedbn_enabled
from strategies.privacy import wrap_strategy
from strategies.robust import build_robust, is_robust, min_replies
from strategies.secure_aggregation import wrap_secure_aggregation
from strategies.validation import with_validation

MetricsAggregator = Callable[[list[RecordDict], str], MetricRecord]

WEIGHT_KEY = "num-examples"
TRAIN_LOSS_KEY = "train_loss"  # every site's train reply carries its mean training loss


def build(
    cfg: DictConfig,
    num_sites: int,
    *,
    train_metrics_aggr_fn: MetricsAggregator | None = None,
    evaluate_metrics_aggr_fn: MetricsAggregator | None = None,
    node_sites: dict[int, str] | None = None,
    train_sizes: dict[str, int] | None = None,
) -> Strategy:
    """Return the strategy for ``cfg.strategy``, wrapped for ``cfg.validation``,
    ``cfg.privacy`` and ``cfg.secagg``.

    The chain, innermost first: the aggregator; the contribution recorder (``contribution``:
    adds up the single updates the aggregator averages); Flower's central-DP wrapper
    (``central_dp``: noise added once to the average); update validation
    (``strategies.validation``: rejects bad single updates, so the DP noise is calibrated to
    the updates actually averaged); the
    privacy guard (budgets, ledger; it must see each site's reply, rejected ones included);
    FedBN (completes replies with the global normalisation layers); compression (decodes
    each reply, counts the bytes of train messages; strategies/compression.py); secure aggregation
    outermost (``strategies.secure_aggregation``): it turns the masked replies into per-site
    replies carrying the unmasked weighted average, so everything inside works unchanged
    (validation is then off: no single update is visible). ``node_sites`` maps node ids to
    site names (ledger, rejections); ``train_sizes`` maps site names to the training examples
    each reported in the query round (plausible counts).
    """
    base = _aggregator(cfg, num_sites, train_metrics_aggr_fn, evaluate_metrics_aggr_fn)
    # contribution scores: the innermost wrapper adds up the single updates the aggregator
    # averages (strategies/contribution.py)
    base = contribution.wrap(base, cfg, str(getattr(base, "weighted_by_key", WEIGHT_KEY)),
                             _site_name)

    def validated(inner: Strategy) -> Strategy:
        needed = min_replies(cfg.strategy) if is_robust(cfg.strategy.name) else 1
        return with_validation(inner, cfg, node_sites, train_sizes, needed)

    strategy = wrap_strategy(base, cfg, num_sites, node_sites, inside_guard=validated)
    # FedBN: replies lacking the sites' normalisation layers are completed with the global
    # entries before any DP wrapper or aggregator sees them (strategies/fedbn.py)
    strategy = FedBN(strategy) if fedbn_enabled(cfg) else strategy
    # compression (and the bytes each train message carries): replies are decoded before any
    # other wrapper sees them (strategies/compression.py); refused under secure aggregation
    strategy = with_compression(strategy, cfg, node_sites)
    return wrap_secure_aggregation(strategy, cfg)


class FedAdam(flwr_strategy.FedAdam):
    """Flower's FedAdam, keeping the global model's dtypes.

    Flower's Adam step computes in float64, which turned a float32 model into a float64 one
    after the first round: twice the bytes sent down, and every site's (float32) reply then
    failed update validation's dtype check, so rounds 2.. were skipped.
    """

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's FedAdam step, cast back to the dtypes of the model it started from."""
        dtypes = {k: v.dtype for k, v in (self.current_arrays or {}).items()}
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None or not dtypes:
            return arrays, metrics
        return ArrayRecord({
            k: Array(np.asarray(a.numpy(), dtype=dtypes.get(k))) for k, a in arrays.items()
        }), metrics


def _site_name(content: RecordDict) -> str:
    from fl_app.metrics import site_name  # fl_app imports strategies, not the other way round

    return site_name(content)


class QFedAvg(flwr_strategy.QFedAvg):
    """Flower's q-FedAvg, keeping the global model's dtypes.

    Flower's step computes in float64 (its loss weights are NumPy float64 scalars), which
    would turn a float32 model into a float64 one (update validation then rejects every
    float32 reply, as it did for FedAdam), and scales arrays in place, which fails on integer
    arrays. Integer arrays (BatchNorm's batch counter) are not parameters: they are kept out
    of the q-FedAvg step (and its norms) and averaged as FedAvg would; every result is cast
    back to the global model's dtype.
    """

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's q-FedAvg step on the floating-point arrays, in the model's dtypes."""
        replies = list(replies)
        if self.current_arrays is None:
            return super().aggregate_train(server_round, replies)
        dtypes = {k: v.dtype for k, v in self.current_arrays.items()}
        integer = [k for k, d in dtypes.items() if not np.issubdtype(np.dtype(d), np.floating)]
        held: dict[str, list[np.ndarray]] = {k: [] for k in integer}
        glob = {k: self.current_arrays.pop(k).numpy() for k in integer}
        for reply in replies:
            record = None if reply.has_error() else reply.content.array_records.get(
                self.arrayrecord_key)
            for key in integer if record is not None else []:
                if key in record:
                    held[key].append(record.pop(key).numpy())
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None:
            return arrays, metrics
        out = {k: np.asarray(arrays[k].numpy(), dtype=dtypes[k]) for k in arrays}
        for key in integer:
            out[key] = (np.asarray(np.rint(np.mean(held[key], axis=0)), dtype=dtypes[key])
                        if held[key] else glob[key])
        return ArrayRecord({k: Array(out[k]) for k in dtypes if k in out}), metrics


def _aggregator(
    cfg: DictConfig,
    num_sites: int,
    train_metrics_aggr_fn: MetricsAggregator | None = None,
    evaluate_metrics_aggr_fn: MetricsAggregator | None = None,
) -> Strategy:
    """Return the aggregating strategy for ``cfg.strategy`` over ``num_sites`` sites.

    ``min_sites`` sites (default: all) must be connected before a round starts
    (``min_available_nodes``), and the sampling fractions come from the config.
    """
    scfg = cfg.strategy
    # Flower's sampler waits forever while fewer than min_available_nodes are connected, so
    # never ask for more than the sites that must stay (min_sites; null = all). Dropouts below
    # that are handled by fl_app.federation_guard, which ends the run instead of hanging.
    min_nodes = min(num_sites, cfg.min_sites) if cfg.get("min_sites") else num_sites
    common: dict[str, Any] = {
        "fraction_train": scfg.fraction_train,
        "fraction_evaluate": scfg.fraction_evaluate,
        "min_train_nodes": max(1, min(round(scfg.fraction_train * num_sites), min_nodes)),
        "min_evaluate_nodes": max(
            1, min(round(scfg.fraction_evaluate * num_sites), min_nodes)
        ),
        "min_available_nodes": min_nodes,
        # central DP averages sites with equal weight (its noise assumes that); see budget.py
        "weighted_by_key": UNIFORM_WEIGHT_KEY if mechanism(cfg) == "central_dp" else WEIGHT_KEY,
        "train_metrics_aggr_fn": train_metrics_aggr_fn,
        "evaluate_metrics_aggr_fn": evaluate_metrics_aggr_fn,
    }
    if scfg.name == "fedavg":
        return FedAvg(**common)
    if scfg.name == "fedprox":
        return FedProx(**common, proximal_mu=scfg.proximal_mu)
    if is_robust(scfg.name):
        return build_robust(scfg, common, num_sites)
    if scfg.name == "qfedavg":
        lr = scfg.client_learning_rate
        return QFedAvg(**common, q=scfg.q, train_loss_key=TRAIN_LOSS_KEY,
                       client_learning_rate=float(cfg.task.lr if lr is None else lr))
    if scfg.name == "fedadam":
        return FedAdam(
            **common, eta=scfg.eta, eta_l=scfg.eta_l,
            beta_1=scfg.beta_1, beta_2=scfg.beta_2, tau=scfg.tau,
        )
    raise ValueError(
        f"unknown strategy '{scfg.name}'; choose fedavg, fedprox, fedadam, qfedavg, median, "
        "trimmed_mean, krum, multikrum or bulyan"
    )
