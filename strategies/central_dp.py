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
  (0.5 = the median).
- Adaptive clipping's count, as analysed: Flower splits the noise multiplier z as
  z_update = (z^-2 - (2 sigma_b)^-2)^-1/2, which is Andrew et al.'s Theorem 1 for bits of
  +-1/2 (one site moves their sum by 1/2, so count noise sigma_b is a Gaussian release at
  multiplier 2 sigma_b). Flower releases a raw 0/1 count (one site moves it by 1: multiplier
  sigma_b, effective z 0.756 instead of 1 for z = sigma_b = 1) over the actual number of
  replies. We release sum(b_i - 1/2) + N(0, sigma_b^2) over the FIXED expected number of
  sites (public), so the two releases together are exactly one Gaussian release at z.
- Zero updates: Flower's clipping divides by the update's norm (ZeroDivisionError on an
  all-zero update); server-side clipping here and the client mod treat a zero update as
  unclipped and unchanged.
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
from flwr.serverapp.strategy.dp_fixed_clipping import validate_replies
from flwr.supercore.differential_privacy import KEY_NORM_BIT, compute_stdv, get_norm
from omegaconf import DictConfig

from strategies.budget import STATUS_EXHAUSTED, STATUS_REFUSED, PrivacyConfigError, read_spend
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
        # the planned number of sites per round: public, fixed (the count's denominator)
        self.expected_count = int(self.num_sampled_clients)

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
        """Noisy fraction of CLIPPED updates from +-1/2 bits over the expected count.

        Each of the ``total`` sites contributes b_i = 1/2 if unclipped, -1/2 if clipped; only
        sum(b_i) + N(0, sigma_b^2) is used (from the secret generator), divided by the
        fixed ``expected_count``: the unclipped fraction is that + 1/2.
        """
        bits = (total - count) - total / 2.0
        noisy = bits + float(self.rng.normal(0.0, self.clipped_count_stddev))
        return 1.0 - (noisy / float(self.expected_count) + 0.5)


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


def clip_update(new: list[np.ndarray], current: list[np.ndarray], clipping_norm: float
                ) -> tuple[list[np.ndarray], bool]:
    """``current + clip(new - current)`` and whether clipping scaled the update.

    Flower's FlatClip (``clip_inputs_inplace``), without its division by a zero norm: an
    all-zero update is within every norm and stays zero.
    """
    update = [np.subtract(x, y) for x, y in zip(new, current, strict=True)]
    norm = get_norm(update)
    clipped = norm > clipping_norm
    if clipped:
        scale = clipping_norm / norm
        update = [u * scale for u in update]
    return [np.asarray(c + u, dtype=np.asarray(x).dtype)
            for c, u, x in zip(current, update, new, strict=True)], clipped


class _ServerClipping:
    """Server-side clipping for Flower's server-side wrappers (zero-safe, +-1/2 count)."""

    clipping_norm: float
    num_sampled_clients: int
    current_arrays: ArrayRecord
    strategy: Strategy
    round_clipping_norm: float | None
    last_noise_stdv: float | None

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Clip every update to this round's norm, average, add noise (adapt the norm)."""
        replies = list(replies)
        self.round_clipping_norm = float(self.clipping_norm)
        self.last_noise_stdv = None
        if not validate_replies(replies, self.num_sampled_clients):
            return None, None
        current = self.current_arrays.to_numpy_ndarrays()
        clipped = 0
        for reply in replies:
            for name, record in list(reply.content.array_records.items()):
                arrays, was_clipped = clip_update(record.to_numpy_ndarrays(), current,
                                                  self.round_clipping_norm)
                clipped += int(was_clipped)
                reply.content[name] = ArrayRecord(
                    {k: Array(v) for k, v in zip(record.keys(), arrays, strict=True)})
        aggregated, metrics = self.strategy.aggregate_train(server_round, replies)
        if hasattr(self, "clipped_count_stddev"):  # adaptive: next round's norm
            fraction = self._noisy_fraction(clipped, len(replies))  # type: ignore[attr-defined]
            self._geometric_update(fraction)  # type: ignore[attr-defined]
        if aggregated:
            aggregated = self._add_noise_to_aggregated_arrays(aggregated)  # type: ignore[attr-defined]
        return aggregated, metrics


class ServerSideFixedClipping(_ServerClipping, _RoundNoise,
                              DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed clipping with secret noise."""


class ClientSideFixedClipping(_RoundNoise, DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed clipping (sites run ``fixedclipping_mod``) with secret noise."""


class ServerSideAdaptiveClipping(
    _ServerClipping, _RoundNoise, _QuantileTracking, DifferentialPrivacyServerSideAdaptiveClipping
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
        if spend is not None and spend.get("status") in (STATUS_EXHAUSTED, STATUS_REFUSED):
            # a site that did not train sends no update; the server drops the reply anyway
            return reply
        if not reply.has_error() and _is_zero_update(msg, reply):
            # Flower's clipping would divide by the zero norm: a zero update is unclipped
            if privacy.get("adaptive"):
                for record in reply.content.metric_records.values():
                    record[KEY_NORM_BIT] = 0
            return reply
        return mod(msg, ctxt, lambda _msg, _ctxt: reply)

    return central_dp_clipping_mod


def _is_zero_update(msg: Message, reply: Message) -> bool:
    sent = next(iter(msg.content.array_records.values())).to_numpy_ndarrays()
    back = next(iter(reply.content.array_records.values())).to_numpy_ndarrays()
    return len(sent) == len(back) and all(
        a.shape == b.shape and np.array_equal(a, b) for a, b in zip(sent, back, strict=True))


def _privacy_of(msg: Message, config_key: str) -> dict[str, Any]:
    for record in msg.content.config_records.values():
        if config_key in record:
            return dict(json.loads(str(record[config_key])).get("privacy") or {})
    return {}
