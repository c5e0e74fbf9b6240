"""FedBN (Li et al., ICLR 2021): normalisation layers stay at each site.

Site side, ``fedbn_mod`` (a Flower client mod on the train and evaluate handlers; on train it
wraps the inner mods such as DP clipping and sits inside secure aggregation, which must
protect the update without the site-local layers):
- incoming train/evaluate message: the global model's normalisation entries (weights,
  biases, running statistics of BatchNorm/GroupNorm/LayerNorm/InstanceNorm layers) are
  replaced by the site's own, kept in ``context.state["fedbn"]`` (an ArrayRecord), so the
  site trains and evaluates with its own normalisation; in the first round, when the site has
  none yet, it starts from the global initialisation;
- outgoing train reply: the normalisation entries are stored in ``context.state`` and removed
  from the reply, so they never reach the server. The reply's metrics gain
  ``fedbn-norm-drift-start`` / ``fedbn-norm-drift-end`` (L2 distance of the site's
  normalisation entries from the global model's before and after local training) and
  ``fedbn-local-rounds`` (rounds the site's normalisation has been kept so far).

Server side, ``FedBN`` wraps any strategy: before aggregation it completes each reply with the
global model's own entries for the keys the sites did not send, so the aggregate keeps the
global (initial) normalisation entries and every other key is aggregated as usual.

Enable with ``fedbn=true`` (top-level config key). The released global model
(``final_model.pt``) then carries the initial normalisation layers: each site's own layers stay
at the site, as FedBN intends. With central DP and client-side clipping the clipping mod runs
inside ``fedbn_mod``, so it clips the full update (normalisation included), a conservative bound.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord
from flwr.clientapp.typing import ClientAppCallable
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from torch import nn

from strategies.wrapper import StrategyWrapper

STATE_KEY = "fedbn"  # context.state ArrayRecord with the site's normalisation entries
ROUNDS_KEY = "fedbn-rounds"  # context.state MetricRecord: rounds kept so far
CONFIG_KEY = "cfg"  # the experiment config (JSON) in every train/evaluate ConfigRecord
ARRAYS_KEY = "arrays"
METRIC_START, METRIC_END, METRIC_ROUNDS = (
    "fedbn-norm-drift-start", "fedbn-norm-drift-end", "fedbn-local-rounds",
)
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*d, SyncBatchNorm, InstanceNorm*d
    nn.GroupNorm,
    nn.LayerNorm,
)


def enabled(cfg: Any) -> bool:
    """Whether the experiment config asks for FedBN (``fedbn: true``)."""
    return cfg.get("fedbn", False)


def norm_state_keys(model: nn.Module) -> list[str]:
    """State-dict keys of every normalisation layer (parameters and running statistics).

    An Opacus ``GradSampleModule`` prefix (``_module.``) is stripped, so the keys match the
    weights a site sends.
    """
    keys = []
    for name, module in model.named_modules():
        if isinstance(module, NORM_TYPES):
            prefix = name.removeprefix("_module.").removeprefix("_module")
            keys += [f"{prefix}.{k}" if prefix else k for k in module.state_dict()]
    return keys


def _norm_keys_for(msg: Message, context: Context) -> list[str]:
    """Normalisation keys of this experiment's model, built the way the site builds it."""
    from fl_app.site_runtime import SiteSession  # the Flower glue; imported late (no cycle)

    session = SiteSession(msg, context.node_config)
    return norm_state_keys(session.task.build_model(session.cfg, session.site().info))


def _drift(a: ArrayRecord, b: ArrayRecord, keys: list[str]) -> float:
    """L2 distance between the floating-point entries ``keys`` of two ArrayRecords."""
    total = 0.0
    for key in keys:
        x, y = a[key].numpy(), b[key].numpy()
        if np.issubdtype(x.dtype, np.floating):
            total += float(np.sum((x.astype(np.float64) - y.astype(np.float64)) ** 2))
    return float(np.sqrt(total))


def _wants_fedbn(msg: Message) -> bool:
    if msg.metadata.message_type not in (MessageType.TRAIN, MessageType.EVALUATE):
        return False
    if ARRAYS_KEY not in msg.content.array_records or "config" not in msg.content:
        return False
    text = msg.content["config"].get(CONFIG_KEY)
    return bool(text) and bool(json.loads(str(text)).get("fedbn", False))


def fedbn_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Client mod: keep normalisation layers local (see the module docstring)."""
    if not _wants_fedbn(msg):
        return call_next(msg, context)
    keys = _norm_keys_for(msg, context)
    arrays: ArrayRecord = msg.content[ARRAYS_KEY]
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise KeyError(f"FedBN: the global model lacks normalisation entries {missing[:3]}")
    global_norm = ArrayRecord({k: arrays[k] for k in keys})
    local = context.state.get(STATE_KEY)
    drift_start = 0.0
    if isinstance(local, ArrayRecord):
        drift_start = _drift(local, global_norm, keys)
        # a new record (the sender's stays untouched), same keys in the same order
        msg.content[ARRAYS_KEY] = ArrayRecord(
            {k: local[k] if k in global_norm else v for k, v in arrays.items()}
        )
    reply = call_next(msg, context)
    if msg.metadata.message_type != MessageType.TRAIN or reply.has_error():
        return reply
    if ARRAYS_KEY not in reply.content.array_records:  # e.g. a site that declined to train
        return reply
    out: ArrayRecord = reply.content[ARRAYS_KEY]
    kept = ArrayRecord({k: Array(out[k].numpy()) for k in keys})
    rounds = int(context.state.get(ROUNDS_KEY, MetricRecord({"n": 0}))["n"]) + 1
    context.state[STATE_KEY] = kept
    context.state[ROUNDS_KEY] = MetricRecord({"n": rounds})
    reply.content[ARRAYS_KEY] = ArrayRecord({k: v for k, v in out.items() if k not in keys})
    for record in reply.content.metric_records.values():
        record[METRIC_START] = drift_start
        record[METRIC_END] = _drift(kept, global_norm, keys)
        record[METRIC_ROUNDS] = rounds
    return reply


class FedBN(StrategyWrapper):
    """Server side of FedBN: aggregate what sites send, keep global entries for the rest.

    Wraps any Message-API strategy; every call is delegated to it. Replies that lack some of
    the global model's keys (the sites' normalisation layers) are completed with the global
    model's own entries before the wrapped strategy aggregates, so its aggregate keeps them.
    """

    def __init__(self, strategy: Strategy) -> None:
        super().__init__(strategy)
        self._global: ArrayRecord | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the global model of this round, then delegate."""
        self._global = arrays
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Complete each reply with the global entries it lacks, delegate, then put back the
        exact global entries for keys no site sent (a weighted mean of equal values can differ
        in the last bit, and a DP wrapper would add noise to them)."""
        replies = list(replies)
        if self._global is None:
            return self.strategy.aggregate_train(server_round, replies)
        sent: set[str] = set()
        for reply in replies:
            if reply.has_content() and ARRAYS_KEY in reply.content.array_records:
                sent.update(reply.content[ARRAYS_KEY].keys())
                reply.content[ARRAYS_KEY] = complete(reply.content[ARRAYS_KEY], self._global)
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if arrays is not None:
            arrays = ArrayRecord({
                k: self._global[k] if k not in sent and k in self._global else v
                for k, v in arrays.items()
            })
        return arrays, metrics


def complete(sent: ArrayRecord, global_arrays: ArrayRecord) -> ArrayRecord:
    """``sent`` plus the global model's entries for keys it lacks, in the global key order."""
    return ArrayRecord({k: sent[k] if k in sent else global_arrays[k] for k in global_arrays})
