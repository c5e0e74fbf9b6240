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
# Train-config key: the central-DP epsilon a site would have spent after this round
CENTRAL_EPSILON_NEXT_KEY = "privacy-central-epsilon-next"
# MetricRecord key (always 1) that central DP weights FedAvg by: every site counts equally,
# which is what bounds one site's influence on the average by clipping_norm / num_sites
UNIFORM_WEIGHT_KEY = "dp-weight"
# node_config key a hospital can set on its SuperNode to cap its own epsilon
NODE_EPSILON_KEY = "privacy-epsilon-budget"

STATUS_TRAINED = "trained"
STATUS_EXHAUSTED = "budget_exhausted"
STATUS_EXCLUDED = "excluded"  # exhausted in an earlier round; not asked any more
STATUS_NOT_SAMPLED = "not_sampled"
STATUS_NO_REPLY = "no_reply"
STATUS_ERROR = "error"

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
