"""Privacy settings shared by the server and the sites: names, config checks, budgets.

Nothing here trains or aggregates; it reads ``cfg.privacy`` (and a SuperNode's node_config)
and says which mechanism runs, with which parameters, and what each site may spend.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from flwr.app import ConfigRecord, RecordDict
from flwr.serverapp.exception import PrivacyBudgetExhausted
from omegaconf import DictConfig

MECHANISMS = ("none", "local_dp", "central_dp")
ACCOUNTANT_NAMES = ("rdp", "prv")
GRAD_SAMPLE_MODES = ("auto", "hooks", "ew", "functorch")

# ConfigRecord every train reply carries under privacy: {"spend": <json of the site's spend>}
PRIVACY_RECORD = "privacy"
# MetricRecord key (always 1) that central DP weights FedAvg by: every site counts equally,
# which is what bounds one site's influence on the average by clipping_norm / num_sites
UNIFORM_WEIGHT_KEY = "dp-weight"
# node_config keys a hospital sets on its SuperNode (scripts/deploy/supernode.py): the most
# epsilon it will spend, the largest delta and the mechanisms it accepts (comma-separated)
NODE_EPSILON_KEY = "privacy-epsilon-budget"
NODE_DELTA_KEY = "privacy-delta"
NODE_MECHANISMS_KEY = "privacy-mechanisms"
DEFAULT_MAX_DELTA = 1e-5  # a site never accepts a larger delta unless its node_config says so

STATUS_TRAINED = "trained"
STATUS_EXHAUSTED = "budget_exhausted"
STATUS_EXCLUDED = "excluded"  # exhausted in an earlier round; not asked any more
STATUS_NOT_SAMPLED = "not_sampled"
STATUS_NO_REPLY = "no_reply"
STATUS_ERROR = "error"
STATUS_REFUSED = "refused"  # the request broke the hospital's own limits (node_config)
STATUS_REJECTED = "rejected"  # the server refused the reply (inconsistent epsilon, norm too big)
STATUS_IN_ROUND = "in_round"  # privacy.secret_sample: sampled or not is not published

# The privacy ledger's interface: exactly these keys (plus ``status``) on every line.
LEDGER_KEYS = (
    "site", "round", "mechanism", "noise_multiplier", "clipping_norm", "sample_rate",
    "steps", "epsilon", "delta", "accountant",
)


class PrivacyConfigError(ValueError):
    """A privacy setting that cannot be used; the message names the key."""


class PrivacyStop(PrivacyBudgetExhausted):
    """Too few sites have privacy budget left to continue: end the run cleanly."""


def mechanism(cfg: DictConfig) -> str:
    """``none``, ``local_dp`` or ``central_dp`` (the preset's ``mechanism``, else its name)."""
    return cfg.privacy.get("mechanism", None) or cfg.privacy.name


def _positive(p: DictConfig, key: str, allow_none: bool = False, allow_zero: bool = False) -> None:
    value = p.get(key, None)
    if value is None and allow_none:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise PrivacyConfigError(
            f"privacy.{key} must be a positive number{' or null' if allow_none else ''}, "
            f"got {value!r}"
        )


def check_privacy_config(cfg: DictConfig) -> str:
    """Validate ``cfg.privacy`` for its mechanism; return the mechanism name."""
    mech = mechanism(cfg)
    if mech not in MECHANISMS:
        raise PrivacyConfigError(
            f"privacy.mechanism must be one of {', '.join(MECHANISMS)}, got '{mech}'"
        )
    if mech == "none":
        return mech
    p = cfg.privacy
    if str(p.accountant) not in ACCOUNTANT_NAMES:
        raise PrivacyConfigError(
            f"privacy.accountant must be one of {', '.join(ACCOUNTANT_NAMES)}, got '{p.accountant}'"
        )
    delta = p.target_delta
    if not isinstance(delta, (int, float)) or not 0 < float(delta) < 1:
        raise PrivacyConfigError(f"privacy.target_delta must be in (0, 1), got {delta!r}")
    if mech == "local_dp":
        if (p.get("target_epsilon") is None) == (p.get("noise_multiplier") is None):
            raise PrivacyConfigError(
                "local_dp needs exactly one of privacy.target_epsilon (noise calibrated for the "
                "whole run) and privacy.noise_multiplier; set the other to null"
            )
        _positive(p, "target_epsilon", allow_none=True)
        _positive(p, "noise_multiplier", allow_none=True)
        _positive(p, "max_grad_norm")
        if str(p.grad_sample_mode) not in GRAD_SAMPLE_MODES:
            raise PrivacyConfigError(
                f"privacy.grad_sample_mode must be one of {', '.join(GRAD_SAMPLE_MODES)}, "
                f"got '{p.grad_sample_mode}'"
            )
    else:
        _positive(p, "noise_multiplier")
        _positive(p, "clipping_norm")
        if str(p.clipping) not in ("server", "client"):
            raise PrivacyConfigError(
                f"privacy.clipping must be 'server' or 'client', got '{p.clipping}'"
            )
        if p.adaptive:
            _positive(p, "clipped_count_stddev", allow_none=True)
            _positive(p, "clip_norm_lr")
            if not 0 <= float(p.target_clipped_quantile) <= 1:
                raise PrivacyConfigError("privacy.target_clipped_quantile must be in [0, 1]")
    budget = p.get("budget", None)
    if budget is not None:
        _positive(budget, "epsilon", allow_none=True)
        if budget.get("delta") is not None and not 0 < budget.delta < 1:
            raise PrivacyConfigError(
                f"privacy.budget.delta must be in (0, 1), got {budget.delta!r}"
            )
        if (mech == "central_dp" and budget.get("delta") is not None
                and budget.delta != float(delta)):
            # the server composes central DP at target_delta; one delta keeps the check honest
            raise PrivacyConfigError(
                "central_dp: privacy.budget.delta must be null or equal privacy.target_delta"
            )
        if budget.get("min_sites", 1) < 1:
            raise PrivacyConfigError("privacy.budget.min_sites must be at least 1")
        for site, item in (budget.get("per_site") or {}).items():
            if not isinstance(item, DictConfig) or item.get("epsilon") is None:
                raise PrivacyConfigError(
                    f"privacy.budget.per_site.{site} must be a mapping with an 'epsilon' "
                    "(e.g. +privacy.budget.per_site.cleveland.epsilon=2.0)"
                )
    return mech


@dataclass(frozen=True)
class Budget:
    """A site's privacy budget: the (epsilon, delta) it may spend over the whole run."""

    epsilon: float | None  # None = no budget
    delta: float

    def exceeded_by(self, epsilon: float) -> bool:
        """Whether spending up to ``epsilon`` (at ``delta``) breaks the budget."""
        return self.epsilon is not None and epsilon > self.epsilon


def site_budget(cfg: DictConfig, site: str, node_config: dict[str, Any] | None = None) -> Budget:
    """The budget of ``site``: ``privacy.budget`` (per-site entry wins), capped by the site.

    A hospital may cap its own epsilon in its SuperNode's node_config
    (``privacy-epsilon-budget=2.0``); the stricter of the two applies.
    """
    p = cfg.privacy
    budget = p.get("budget", None)
    delta = float(p.get("target_delta", None) or 0.0)
    eps: float | None = None
    if budget is not None:
        eps = None if budget.get("epsilon") is None else budget.epsilon
        delta = budget.delta if budget.get("delta") is not None else delta
        per_site = budget.get("per_site") or {}
        if site in per_site:
            eps = float(per_site[site].epsilon)
    if node_config and NODE_EPSILON_KEY in node_config:
        own = float(node_config[NODE_EPSILON_KEY])
        eps = own if eps is None else min(eps, own)
    return Budget(epsilon=eps, delta=delta)


@dataclass(frozen=True)
class SiteLimits:
    """What a hospital accepts, from its own node_config, whatever the server's config says.

    ``mechanisms``: ``privacy-mechanisms`` (comma-separated); unset = both DP mechanisms, and
    ``none`` too unless the hospital caps its epsilon. ``max_delta``: ``privacy-delta``
    (default 1e-5), never above 1 / (10 N) for N local training records.
    ``max_epsilon``: ``privacy-epsilon-budget`` (None = no cap of its own).
    """

    mechanisms: tuple[str, ...]
    max_delta: float
    max_epsilon: float | None

    @classmethod
    def from_node_config(cls, node_config: dict[str, Any], num_records: int) -> SiteLimits:
        """The limits a SuperNode's node_config sets, for a site with ``num_records``."""
        cap = node_config.get(NODE_EPSILON_KEY)
        max_epsilon = None if cap is None else float(cap)
        if NODE_MECHANISMS_KEY in node_config:
            mechanisms = tuple(m.strip() for m in str(node_config[NODE_MECHANISMS_KEY]).split(",")
                               if m.strip())
            unknown = sorted(set(mechanisms) - set(MECHANISMS))
            if unknown:
                raise PrivacyConfigError(
                    f"node_config {NODE_MECHANISMS_KEY} names unknown mechanism(s) "
                    f"{', '.join(unknown)}; choose from {', '.join(MECHANISMS)}"
                )
        else:
            mechanisms = ("local_dp", "central_dp") + (("none",) if max_epsilon is None else ())
        own = float(node_config.get(NODE_DELTA_KEY, DEFAULT_MAX_DELTA))
        return cls(mechanisms=mechanisms, max_delta=min(own, 1.0 / (10 * max(num_records, 1))),
                   max_epsilon=max_epsilon)

    def refusal(self, mech: str, delta: float | None) -> str | None:
        """Why this hospital refuses a request for ``mech`` at ``delta``; None if it accepts."""
        if mech not in self.mechanisms:
            return (f"this hospital accepts privacy mechanism(s) {', '.join(self.mechanisms)} "
                    f"(node_config {NODE_MECHANISMS_KEY}/{NODE_EPSILON_KEY}); the server asked "
                    f"for privacy={mech}")
        if mech != "none" and delta is not None and delta > self.max_delta:
            return (f"the server asked for delta {delta:g}, above this hospital's limit "
                    f"{self.max_delta:g} (node_config {NODE_DELTA_KEY}, at most 1/(10 x local "
                    "records))")
        return None


def secret_sample(cfg: DictConfig) -> bool:
    """Central DP with ``privacy.secret_sample``: who was sampled is kept out of every file."""
    return mechanism(cfg) == "central_dp" and bool(cfg.privacy.get("secret_sample", False))


def min_sites(cfg: DictConfig) -> int:
    """Fewest sites with budget left for the run to go on (``privacy.budget.min_sites``)."""
    budget = cfg.privacy.get("budget", None)
    return budget.get("min_sites", 1) if budget is not None else 1


def spend_record(spend: dict[str, Any]) -> ConfigRecord:
    """The ConfigRecord a site adds to its train reply (JSON: ConfigRecords hold no None)."""
    return ConfigRecord({"spend": json.dumps(spend, sort_keys=True)})


def read_spend(content: RecordDict) -> dict[str, Any] | None:
    """The spend a site reported in a reply, or None when it reported none."""
    if PRIVACY_RECORD not in content:
        return None
    return json.loads(str(content[PRIVACY_RECORD]["spend"]))
