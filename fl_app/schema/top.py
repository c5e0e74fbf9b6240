"""Schema of the top-level keys of ``conf/config.yaml`` (values and comments live there)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING


@dataclass
class Validation:
    """``validation``: update validation before aggregation (strategies/validation.py)."""

    enabled: bool = MISSING
    max_update_norm: float | None = MISSING
    max_norm_ratio: float | None = MISSING
    min_valid_replies: int = MISSING


@dataclass
class Audit:
    """``audit``: audits of the final model (fl_app/site_audits.py)."""

    membership: bool = MISSING


@dataclass
class Config:
    """Top level. The groups are typed by their selected option's own schema."""

    task: Any = MISSING
    strategy: Any = MISSING
    privacy: Any = MISSING
    secagg: Any = MISSING
    partition: Any = MISSING
    tracking: Any = MISSING
    personalize: Any = MISSING
    contribution: Any = MISSING
    num_rounds: int = MISSING
    seed: int = MISSING
    fedbn: bool = MISSING
    output_dir: str = MISSING
    device: str = MISSING
    min_sites: int | None = MISSING
    on_site_failure: str = MISSING
    site_registry: str | None = MISSING
    wait_for_nodes_s: float = MISSING
    round_timeout_s: float = MISSING
    resume: str | None = MISSING
    validation: Validation = field(default_factory=Validation)
    # site -> fault (simulation only; fl_app/faults.py)
    faults: dict[str, str] = field(default_factory=dict)
    evaluate_in_train: bool = MISSING
    # none | fp16 | int8 | topk:<fraction> (strategies/compression.py)
    compression: str = MISSING
    audit: Audit = field(default_factory=Audit)
