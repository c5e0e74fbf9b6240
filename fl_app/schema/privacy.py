"""Schemas of ``conf/privacy/*.yaml`` (values and comments live in the yaml files)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING


@dataclass
class NoPrivacy:
    """conf/privacy/none.yaml; the base of every privacy option."""

    name: str = MISSING
    mechanism: str = MISSING


@dataclass
class Budget:
    """``privacy.budget`` of the DP options."""

    epsilon: float | None = MISSING
    delta: float | None = MISSING
    # site -> {epsilon, delta}, e.g. +privacy.budget.per_site.cleveland.epsilon=2.0 (untyped:
    # OmegaConf cannot create a dataclass value from a dotted `+` override; budget.py checks it)
    per_site: dict[str, Any] = field(default_factory=dict)
    min_sites: int = MISSING


@dataclass
class LocalDP(NoPrivacy):
    """conf/privacy/local_dp.yaml."""

    accountant: str = MISSING
    target_epsilon: float | None = MISSING
    target_delta: float = MISSING
    noise_multiplier: float | None = MISSING
    max_grad_norm: float = MISSING
    grad_sample_mode: str = MISSING
    secure_mode: bool = MISSING
    # the simulated hospitals' ledgers (strategies/site_ledger.py); deployment: node_config
    ledger_scope: str = MISSING
    site_state_dir: str | None = MISSING
    budget: Budget = field(default_factory=Budget)


@dataclass
class CentralDP(NoPrivacy):
    """conf/privacy/central_dp*.yaml."""

    accountant: str = MISSING
    target_delta: float = MISSING
    noise_multiplier: float = MISSING
    clipping_norm: float = MISSING
    clipping: str = MISSING
    adaptive: bool = MISSING
    target_clipped_quantile: float = MISSING
    clip_norm_lr: float = MISSING
    clipped_count_stddev: float | None = MISSING
    ledger_scope: str = MISSING
    site_state_dir: str | None = MISSING
    secret_sample: bool = MISSING
    budget: Budget = field(default_factory=Budget)


SCHEMAS: dict[str, type] = {
    "none_schema": NoPrivacy,
    "local_dp_schema": LocalDP,
    "central_dp_schema": CentralDP,
}
