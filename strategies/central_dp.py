"""Central (client-level) differential privacy on Flower's own DP strategy wrappers.

Each site's model update is clipped to an L2 norm (on the server, or at the site with
Flower's ``fixedclipping_mod`` / ``adaptiveclipping_mod``, which secure aggregation needs),
the clipped updates are averaged with equal weights, and Gaussian noise of standard
deviation ``noise_multiplier * clipping_norm / num_sites_aggregated`` is added to the average.

The four Flower wrappers (``DifferentialPrivacy{Server,Client}Side{Fixed,Adaptive}Clipping``)
are used as they are, with two corrections that the accounting depends on:
- Noise comes from the operating system's entropy (``numpy.random.default_rng()``). Flower
  draws it from NumPy's global generator, which the experiment seeds with ``cfg.seed``, a
  value written in config.yaml: anyone holding the run folder could regenerate the noise.
- Adaptive clipping: Flower updates the clipping norm before adding noise, so the noise was
  scaled to the NEXT round's norm while the updates were clipped to this round's. We scale
  it to the norm the updates of this round were clipped to (else the effective noise
  multiplier drifts below the configured one whenever the norm shrinks).
- Adaptive clipping's direction: Flower 1.42's Message-API wrappers and mod count CLIPPED
  updates but apply Andrew et al.'s rule, written for the fraction of UNCLIPPED updates
  (Flower's legacy DPFedAvgAdaptive sends ``norm_bit = not clipped``), so the norm shrank when
  every update was clipped and diverged from its target. We apply the rule to the unclipped
  fraction: the norm tracks the ``target_clipped_quantile`` quantile of the update norms
  (0.5 = the median). The privacy cost is unchanged (same noisy count).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.logger import log
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    Strategy,
)
from flwr.supercore.differential_privacy import compute_stdv
from omegaconf import DictConfig

from strategies.budget import STATUS_EXHAUSTED, PrivacyConfigError, read_spend
from strategies.wrapper import unwrap


class _RoundNoise:
    """Mixin for Flower's central-DP wrappers: secret noise scaled to this round's norm."""

    clipping_norm: float
    noise_multiplier: float
    num_sampled_clients: int
    clipped_count_stddev: float

    def __init__(self, *args: Any, rng: np.random.Generator | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rng = rng if rng is not None else np.random.default_rng()
        self.round_clipping_norm: float | None = None
        self.last_noise_stdv: float | None = None

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's aggregation, remembering the norm this round's updates are clipped to."""
        self.round_clipping_norm = float(self.clipping_norm)
        self.last_noise_stdv = None
        return super().aggregate_train(server_round, list(replies))  # type: ignore[misc]

    def _add_noise_to_aggregated_arrays(self, aggregated: ArrayRecord) -> ArrayRecord:
        norm = self.round_clipping_norm
        if norm is None:  # noise added outside aggregate_train: the current norm
            norm = self.clipping_norm
        stdv = compute_stdv(self.noise_multiplier, norm, self.num_sampled_clients)
        noisy = {}
        for key, array in zip(aggregated.keys(), aggregated.to_numpy_ndarrays(), strict=True):
            noise = self.rng.normal(0.0, stdv, array.shape).astype(array.dtype)
            noisy[key] = Array(np.asarray(array + noise))
        self.last_noise_stdv = stdv
        log(INFO, "central DP: Gaussian noise with stdev %.6f added to the average of %d "
            "updates clipped to %.4f", stdv, self.num_sampled_clients, norm)
        return ArrayRecord(noisy)

    def _noisy_fraction(self, count: int, total: int) -> float:
        # adaptive clipping's noisy count of clipped updates, from the same secret generator
        return float(self.rng.normal(count, self.clipped_count_stddev)) / float(total)


class _QuantileTracking:
    """Mixin for Flower's adaptive wrappers: Andrew et al.'s update on the unclipped fraction."""

    clipping_norm: float
    clip_norm_lr: float
    target_clipped_quantile: float

    def _geometric_update(self, clipped_fraction: float) -> None:
        # C <- C * exp(-lr * (unclipped - gamma)): grows while too many updates are clipped
        unclipped = 1.0 - clipped_fraction
        self.clipping_norm *= math.exp(
            -self.clip_norm_lr * (unclipped - self.target_clipped_quantile)
        )


class ServerSideFixedClipping(_RoundNoise, DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed clipping with secret noise."""


class ClientSideFixedClipping(_RoundNoise, DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed clipping (sites run ``fixedclipping_mod``) with secret noise."""


class ServerSideAdaptiveClipping(
    _RoundNoise, _QuantileTracking, DifferentialPrivacyServerSideAdaptiveClipping
):
    """Flower's server-side adaptive clipping; noise scaled to the round's own norm."""


class ClientSideAdaptiveClipping(
    _RoundNoise, _QuantileTracking, DifferentialPrivacyClientSideAdaptiveClipping
):
    """Flower's client-side adaptive clipping (``adaptiveclipping_mod``); round-norm noise."""


def is_averaging(strategy: Strategy) -> bool:
    """Whether ``strategy`` aggregates with FedAvg's plain (weighted) average.

    The noise is calibrated to the sensitivity of an average of clipped updates; a server
    optimizer (FedAdam) or a robust aggregator (median, Krum) transforms the average before
    Flower's wrapper adds noise, and the calibration no longer holds.
    """
    return isinstance(strategy, FedAvg) and type(strategy).aggregate_train is FedAvg.aggregate_train


def build_central_dp(base: Strategy, cfg: DictConfig, num_sampled: int,
                     rng: np.random.Generator | None = None) -> Strategy:
    """Wrap ``base`` with the Flower DP wrapper ``cfg.privacy`` asks for."""
    p = cfg.privacy
    if not is_averaging(base):
        raise PrivacyConfigError(
            f"privacy=central_dp needs an averaging strategy (fedavg or fedprox), not "
            f"'{cfg.strategy.name}': its aggregate is not a plain average of clipped updates, "
            "so the noise would not match the sensitivity"
        )
    z, norm = float(p.noise_multiplier), float(p.clipping_norm)
    if not p.adaptive:
        cls = ClientSideFixedClipping if p.clipping == "client" else ServerSideFixedClipping
        return cls(base, z, norm, num_sampled, rng=rng)
    cls_a = ClientSideAdaptiveClipping if p.clipping == "client" else ServerSideAdaptiveClipping
    stddev = p.get("clipped_count_stddev")
    try:
        return cls_a(
            base, z, num_sampled, initial_clipping_norm=norm,
            target_clipped_quantile=float(p.target_clipped_quantile),
            clip_norm_lr=float(p.clip_norm_lr),
            clipped_count_stddev=None if stddev is None else float(stddev), rng=rng,
        )
    except ValueError as err:
        raise PrivacyConfigError(
            f"privacy.noise_multiplier={z} with adaptive clipping over {num_sampled} sites: "
            f"{err} (set privacy.clipped_count_stddev above noise_multiplier/2)"
        ) from None


def calibrate_central_dp(strategy: Strategy, num_updates: int) -> None:
    """Tell the central-DP wrapper in ``strategy``'s chain how many updates it averages.

    Its noise scales with ``clipping_norm / num_sampled_clients``, so the count must be the
    updates actually averaged this round (after failed, exhausted or rejected replies).
    """
    for inner in unwrap(strategy):
        if isinstance(inner, _RoundNoise):
            inner.num_sampled_clients = max(int(num_updates), 1)


def accounted_noise_multiplier(cfg: DictConfig) -> float:
    """The noise multiplier the accountant composes (the configured one).

    With adaptive clipping Flower splits it (Andrew et al. 2021, Thm. 1) into a larger one for
    the update and ``clipped_count_stddev`` for the clipped-count query; together the two
    releases are exactly as private as one Gaussian release at the configured multiplier.
    """
    return cfg.privacy.noise_multiplier


def make_clipping_mod(config_key: str) -> Mod:
    """A train mod that clips the site's update when the experiment asks for it.

    Runs Flower's ``fixedclipping_mod`` or ``adaptiveclipping_mod`` when the config sent in
    the message (JSON under ``config_key``) says central DP with client-side clipping, and
    is transparent otherwise, so one ClientApp serves every privacy setting.
    """

    def central_dp_clipping_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable
                                ) -> Message:
        privacy = _privacy_of(msg, config_key)
        if (privacy.get("mechanism") or privacy.get("name")) != "central_dp" or (
            privacy.get("clipping") != "client"
        ):
            return call_next(msg, ctxt)
        mod = adaptiveclipping_mod if privacy.get("adaptive") else fixedclipping_mod
        reply = call_next(msg, ctxt)
        spend = None if reply.has_error() else read_spend(reply.content)
        if spend is not None and spend.get("status") == STATUS_EXHAUSTED:
            # a site that did not train sends no update (Flower's clipping would divide
            # by its zero norm); the server drops the reply anyway
            return reply
        return mod(msg, ctxt, lambda _msg, _ctxt: reply)

    return central_dp_clipping_mod


def _privacy_of(msg: Message, config_key: str) -> dict[str, Any]:
    for record in msg.content.config_records.values():
        if config_key in record:
            return dict(json.loads(str(record[config_key])).get("privacy") or {})
    return {}
