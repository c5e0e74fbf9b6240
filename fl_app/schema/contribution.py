"""Schemas of ``conf/contribution/*.yaml`` (values and comments live in the yaml files)."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING


@dataclass
class NoContribution:
    """conf/contribution/none.yaml; the base of every contribution option."""

    name: str = MISSING


@dataclass
class LeaveOneOut(NoContribution):
    """conf/contribution/loo.yaml (checked further by strategies/contribution.py)."""

    utility: str = MISSING
    max_models_per_message: int = MISSING


@dataclass
class Shapley(LeaveOneOut):
    """conf/contribution/shapley.yaml."""

    exact_max_sites: int = MISSING
    max_permutations: int = MISSING
    target_error: float = MISSING
    truncation: float = MISSING
    permutations_per_batch: int = MISSING


SCHEMAS: dict[str, type] = {
    "none_schema": NoContribution,
    "loo_schema": LeaveOneOut,
    "shapley_schema": Shapley,
}
