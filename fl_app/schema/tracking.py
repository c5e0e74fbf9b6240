"""Schemas of ``conf/tracking/*.yaml`` (values and comments live in the yaml files)."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING


@dataclass
class NoTracking:
    """conf/tracking/none.yaml; the base of every tracking option."""

    name: str = MISSING


@dataclass
class Mlflow(NoTracking):
    """conf/tracking/mlflow.yaml (used by fl_app/tracking.py)."""

    tracking_uri: str | None = MISSING
    experiment: str = MISSING
    run_name: str | None = MISSING
    log_artifacts: bool = MISSING


SCHEMAS: dict[str, type] = {
    "none_schema": NoTracking,
    "mlflow_schema": Mlflow,
}
