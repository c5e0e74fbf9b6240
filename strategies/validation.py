"""Update validation: check every site's training reply before it reaches the aggregator.

``UpdateValidation`` wraps the aggregating strategy (inside the privacy guard, outside any
central-DP wrapper, so the guard still accounts for every reply and the DP noise is calibrated
to the updates actually averaged). It rejects a reply when

- its model update is missing, cannot be decoded, or has other keys, shapes or dtypes than
  the global model the site was sent;
- any value is NaN or +/-Inf;
- its update norm (L2 norm of the site's model minus the global model, over the floating-point
  arrays) exceeds ``validation.max_update_norm``, or exceeds ``validation.max_norm_ratio``
  times the median update norm of the round's other checks-passing replies;
- its example count (``num-examples``) is not a whole number, is zero or negative, or is
  *implausible*: larger than the training examples the site reported in the query round
  (``fl_app.sites.SiteFacts.num_train``). A site never trains on more examples than it has.

Under secure aggregation (``secagg``) no single update is visible: validation is then off
(logged), as are the robust aggregators (refused in strategies/secure_aggregation.py).

Each rejection is logged with the site and round and kept in ``rejections`` as
``{"site", "round", "reason"}`` (read by metrics.jsonl and the audit trail through
``round_rejections``); the rest are aggregated. A round with fewer valid replies than the
aggregator needs is skipped with one warning: the global model stays as it was.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from logging import WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from strategies.central_dp import calibrate_central_dp
from strategies.secure_aggregation import secagg_name
from strategies.wrapper import StrategyWrapper, find

ARRAYS_KEY = "arrays"  # the ArrayRecord of a train reply (Flower's default arrayrecord_key)
WEIGHT_KEY = "num-examples"
SITE_RECORD = "site"  # ConfigRecord {"name": site} in every reply (fl_app.metrics.SITE_RECORD)


class ValidationConfigError(ValueError):
    """A ``validation`` setting that cannot be used; the message names the key."""


@dataclass(frozen=True)
class ValidationSettings:
    """The ``validation`` config section (see conf/config.yaml)."""

    max_update_norm: float | None = None
    max_norm_ratio: float | None = None
    min_valid_replies: int = 1


def settings_from(cfg: Any) -> ValidationSettings | None:
    """The validation settings of ``cfg`` (None when ``validation.enabled`` is false)."""
    section = cfg.get("validation") if hasattr(cfg, "get") else None
    if section is None or not bool(section.get("enabled", True)):
        return None

    def positive(key: str) -> float | None:
        value = section.get(key)
        if value is None:
            return None
        value = float(value)
        if not value > 0 or math.isinf(value):
            raise ValidationConfigError(
                f"validation.{key} must be a positive number or null, got {value}"
            )
        return value

    least = int(section.get("min_valid_replies", 1))
    if least < 1:
        raise ValidationConfigError(f"validation.min_valid_replies must be >= 1, got {least}")
    return ValidationSettings(positive("max_update_norm"), positive("max_norm_ratio"), least)


@dataclass(frozen=True)
class Reference:
    """The global model a round's sites started from, decoded once per round."""

    arrays: dict[str, np.ndarray]

    @classmethod
    def of(cls, record: ArrayRecord) -> Reference:
        """Decode ``record`` (the arrays sent in configure_train)."""
        return cls({k: record[k].numpy() for k in record})


def _decode(name: str, array: Any, expected: np.ndarray) -> tuple[np.ndarray | None, str | None]:
    """Decode one Array and compare it with the global entry; (values, None) or (None, why)."""
    if not isinstance(array, Array):
        return None, f"'{name}' is not an array ({type(array).__name__})"
    want_dtype, want_shape = str(expected.dtype), tuple(expected.shape)
    if str(array.dtype) != want_dtype:
        return None, f"'{name}' has dtype {array.dtype}, expected {want_dtype}"
    if tuple(array.shape) != want_shape:
        return None, f"'{name}' has shape {tuple(array.shape)}, expected {want_shape}"
    try:
        values = array.numpy()
    except Exception as err:  # any undecodable payload is a rejection
        return None, f"'{name}' cannot be decoded ({type(err).__name__})"
    # the declared metadata and the serialised payload must agree
    if not isinstance(values, np.ndarray) or str(values.dtype) != want_dtype:
        return None, f"'{name}' holds data of dtype {getattr(values, 'dtype', '?')}, " \
                     f"expected {want_dtype}"
    if tuple(values.shape) != want_shape:
        return None, f"'{name}' holds data of shape {tuple(values.shape)}, expected {want_shape}"
    return values, None


def _example_count(content: RecordDict, max_examples: int | None) -> tuple[int | None, str | None]:
    metrics = list(content.metric_records.values())
    if len(metrics) != 1:
        return None, f"expected one MetricRecord, got {len(metrics)}"
    value = metrics[0].get(WEIGHT_KEY)
    if value is None:
        return None, f"no '{WEIGHT_KEY}' in its metrics"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None, f"'{WEIGHT_KEY}' is not a number ({type(value).__name__})"
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        return None, f"'{WEIGHT_KEY}' {value} is not a whole number"
    count = int(value)
    if count <= 0:
        return None, f"'{WEIGHT_KEY}' {count} is not positive"
    if max_examples is not None and count > max_examples:
        return None, (f"'{WEIGHT_KEY}' {count} is implausible: the site reported {max_examples} "
                      "training examples in the query round")
    return count, None


def check_reply(
    content: RecordDict,
    reference: Reference,
    *,
    max_examples: int | None = None,
    max_update_norm: float | None = None,
) -> tuple[str | None, float | None]:
    """Validate one training reply against the global model it started from.

    Returns ``(None, update_norm)`` for a valid reply and ``(reason, None)`` otherwise; never
    raises on malformed content (a reply is untrusted input).
    """
    try:
        return _check(content, reference, max_examples, max_update_norm)
    except Exception as err:  # malformed input must give a reason, not a crash
        return f"malformed reply ({type(err).__name__}: {err})", None


def _check(
    content: RecordDict, reference: Reference, max_examples: int | None,
    max_update_norm: float | None,
) -> tuple[str | None, float | None]:
    records = list(content.array_records.items())
    if len(records) != 1 or records[0][0] != ARRAYS_KEY:
        return f"expected one ArrayRecord '{ARRAYS_KEY}', got {[k for k, _ in records]}", None
    arrays = records[0][1]
    sent, expected = set(arrays.keys()), set(reference.arrays)
    if sent != expected:
        missing, extra = sorted(expected - sent), sorted(sent - expected)
        return f"wrong keys (missing {missing[:3]}, unexpected {extra[:3]})", None
    _, why = _example_count(content, max_examples)
    if why is not None:
        return why, None
    squares = 0.0
    for name, global_values in reference.arrays.items():
        values, why = _decode(name, arrays[name], global_values)
        if why is not None:
            return why, None
        assert values is not None
        if values.dtype.kind in "fc":
            if not np.all(np.isfinite(values)):
                bad = "NaN" if np.any(np.isnan(values)) else "Inf"
                return f"'{name}' contains {bad}", None
            # in float64/complex128: no overflow of float16/float32 differences
            wide = np.complex128 if values.dtype.kind == "c" else np.float64
            with np.errstate(over="ignore", invalid="ignore"):
                delta = values.astype(wide) - global_values.astype(wide)
                squares += float(np.sum(np.abs(delta) ** 2))
    norm = math.sqrt(squares) if math.isfinite(squares) else math.inf
    if max_update_norm is not None and not norm <= max_update_norm:
        return (f"update norm {norm:.4g} exceeds validation.max_update_norm="
                f"{max_update_norm:g}"), None
    return None, norm


class UpdateValidation(StrategyWrapper):
    """Reject invalid training replies, log why per site and round, aggregate the rest."""

    def __init__(
        self,
        strategy: Strategy,
        settings: ValidationSettings,
        node_sites: Mapping[int, str] | None = None,
        train_sizes: Mapping[str, int] | None = None,
        min_replies: int = 1,
    ) -> None:
        super().__init__(strategy)
        self.settings = settings
        self.node_sites = dict(node_sites or {})
        self.train_sizes = dict(train_sizes or {})
        # the aggregator's own minimum (e.g. Bulyan: 4f+3) or the configured one
        self.min_replies = max(int(min_replies), settings.min_valid_replies)
        self.rejections: list[dict[str, Any]] = []
        self.skipped: dict[int, str] = {}  # round -> why it was skipped
        self._reference: ArrayRecord | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the global model the sites start from, then delegate."""
        self._reference = arrays
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def _site(self, reply: Message) -> str:
        node = reply.metadata.src_node_id
        if node in self.node_sites:  # the server's map, not what the reply claims
            return self.node_sites[node]
        try:
            return str(reply.content[SITE_RECORD]["name"])
        except Exception:  # an unknown sender is still named
            return f"node-{node}"

    def _reject(self, server_round: int, site: str, reason: str) -> None:
        self.rejections.append({"site": site, "round": server_round, "reason": reason})
        log(WARNING, "validation: round %d: update of %s rejected: %s", server_round, site, reason)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Drop invalid replies; aggregate the rest, or skip the round when too few remain."""
        replies = list(replies)
        if self._reference is None:  # configure_train not seen: nothing to compare against
            return self.strategy.aggregate_train(server_round, replies)
        reference = Reference.of(self._reference)
        errors = [r for r in replies if r.has_error()]
        passed: list[tuple[Message, str, float]] = []
        for reply in replies:
            if reply.has_error():
                continue
            site = self._site(reply)
            reason, norm = check_reply(
                reply.content, reference, max_examples=self.train_sizes.get(site),
                max_update_norm=self.settings.max_update_norm,
            )
            if reason is not None:
                self._reject(server_round, site, reason)
            else:
                assert norm is not None
                passed.append((reply, site, norm))
        accepted = self._norm_outliers(server_round, passed)
        if len(accepted) < self.min_replies:
            why = (f"only {len(accepted)} valid update(s) of {len(replies)} replies, at least "
                   f"{self.min_replies} needed")
            self.skipped[server_round] = why
            log(WARNING, "validation: round %d skipped: %s; the global model stays as it was",
                server_round, why)
            return None, None
        calibrate_central_dp(self.strategy, len(accepted))
        return self.strategy.aggregate_train(server_round, errors + accepted)

    def _norm_outliers(
        self, server_round: int, passed: list[tuple[Message, str, float]]
    ) -> list[Message]:
        ratio = self.settings.max_norm_ratio
        if ratio is None or len(passed) < 2:
            return [reply for reply, _, _ in passed]
        median = float(np.median([norm for _, _, norm in passed]))
        keep = []
        for reply, site, norm in passed:
            if median > 0 and norm > ratio * median:
                self._reject(server_round, site, (
                    f"update norm {norm:.4g} is {norm / median:.3g} times the round's median "
                    f"{median:.4g} (validation.max_norm_ratio={ratio:g})"))
            else:
                keep.append(reply)
        return keep

    def round_rejections(self, server_round: int) -> list[dict[str, Any]]:
        """The rejections of ``server_round`` as ``{"site", "round", "reason"}``."""
        return [r for r in self.rejections if r["round"] == server_round]


def round_rejections(strategy: Strategy, server_round: int) -> list[dict[str, Any]]:
    """The updates rejected in ``server_round`` anywhere in ``strategy``'s chain ([] if off)."""
    validation = find(strategy, UpdateValidation)
    return [] if validation is None else validation.round_rejections(server_round)


def skipped_reason(strategy: Strategy, server_round: int) -> str | None:
    """Why validation skipped ``server_round`` (None if it did not)."""
    validation = find(strategy, UpdateValidation)
    return None if validation is None else validation.skipped.get(server_round)


def with_validation(
    strategy: Strategy,
    cfg: Any,
    node_sites: Mapping[int, str] | None = None,
    train_sizes: Mapping[str, int] | None = None,
    min_replies: int = 1,
) -> Strategy:
    """``strategy`` wrapped in ``UpdateValidation`` when ``validation.enabled`` (else as is)."""
    settings = settings_from(cfg)
    if settings is None:
        return strategy
    if secagg_name(cfg) != "none":
        # every reply the wrapper would see carries the same unmasked average: there is no
        # single update to check, and a rejection would blame every site for the sum
        log(WARNING, "validation: off under secure aggregation (secagg=%s): the server sees "
            "only the sum of the updates", secagg_name(cfg))
        return strategy
    return UpdateValidation(strategy, settings, node_sites, train_sizes, min_replies)
