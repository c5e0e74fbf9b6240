"""Schemas of ``conf/strategy/*.yaml`` (values and comments live in the yaml files)."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING


@dataclass
class FedAvg:
    """conf/strategy/fedavg.yaml; the base of every strategy option."""

    name: str = MISSING
    fraction_train: float = MISSING
    fraction_evaluate: float = MISSING


@dataclass
class FedProx(FedAvg):
    """conf/strategy/fedprox.yaml."""

    proximal_mu: float = MISSING


@dataclass
class FedAdam(FedAvg):
    """conf/strategy/fedadam.yaml."""

    eta: float = MISSING
    eta_l: float = MISSING
    beta_1: float = MISSING
    beta_2: float = MISSING
    tau: float = MISSING


SCHEMAS: dict[str, type] = {
    "fedavg_schema": FedAvg,
    "fedprox_schema": FedProx,
    "fedadam_schema": FedAdam,
}
