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


@dataclass
class QFedAvg(FedAvg):
    """conf/strategy/qfedavg.yaml."""

    q: float = MISSING
    client_learning_rate: float | None = MISSING


@dataclass
class Median(FedAvg):
    """conf/strategy/median.yaml."""


@dataclass
class TrimmedMean(FedAvg):
    """conf/strategy/trimmed_mean.yaml."""

    beta: float = MISSING


@dataclass
class Krum(FedAvg):
    """conf/strategy/krum.yaml; the base of multikrum and bulyan."""

    num_malicious_nodes: int = MISSING


@dataclass
class MultiKrum(Krum):
    """conf/strategy/multikrum.yaml."""

    num_nodes_to_select: int = MISSING


@dataclass
class Bulyan(Krum):
    """conf/strategy/bulyan.yaml."""


SCHEMAS: dict[str, type] = {
    "fedavg_schema": FedAvg,
    "fedprox_schema": FedProx,
    "fedadam_schema": FedAdam,
    "qfedavg_schema": QFedAvg,
    "median_schema": Median,
    "trimmed_mean_schema": TrimmedMean,
    "krum_schema": Krum,
    "multikrum_schema": MultiKrum,
    "bulyan_schema": Bulyan,
}
