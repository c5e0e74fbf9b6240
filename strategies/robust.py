"""Robust aggregation: Flower's own Byzantine-robust strategies, chosen by ``strategy=...``.

``median`` (FedMedian: coordinate-wise median), ``trimmed_mean`` (FedTrimmedAvg: coordinate-wise
mean after dropping the ``beta`` fraction of largest and smallest values), ``krum`` (the one
update closest to its neighbours), ``multikrum`` (the mean of the ``num_nodes_to_select`` best
Krum scores) and ``bulyan`` (Multi-Krum selection, then a trimmed coordinate-wise mean), each
configured from ``conf/strategy/<name>.yaml``.

They compose with update validation and local DP. They do not compose with central DP (its
noise is calibrated to a plain average: ``strategies.central_dp.build_central_dp`` refuses) or
with secure aggregation (it hides the single updates these strategies must see).
"""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import Bulyan, FedMedian, FedTrimmedAvg, Krum, MultiKrum, Strategy
from omegaconf import DictConfig

NAMES = ("median", "trimmed_mean", "krum", "multikrum", "bulyan")


class RobustConfigError(ValueError):
    """A robust-aggregation setting that cannot work; the message names the key."""


def is_robust(name: str) -> bool:
    """Whether ``strategy.name`` is one of the robust aggregators."""
    return name in NAMES


def _malicious(scfg: DictConfig) -> int:
    f: int = scfg.get("num_malicious_nodes", 0)
    if f < 0:
        raise RobustConfigError(f"strategy.num_malicious_nodes must be >= 0, got {f}")
    return f


def min_replies(scfg: DictConfig) -> int:
    """Fewest updates the aggregator needs in a round to give its robustness guarantee.

    Krum and Multi-Krum score each update over its n - f - 2 nearest neighbours (n > 2f + 2,
    Blanchard et al. 2017); Bulyan needs n >= 4f + 3 (El Mhamdi et al. 2018). Median and
    trimmed mean work from one update.
    """
    name: str = scfg.name
    if name in ("krum", "multikrum"):
        return 2 * _malicious(scfg) + 3
    if name == "bulyan":
        return 4 * _malicious(scfg) + 3
    return 1


def build_robust(scfg: DictConfig, common: dict[str, Any], num_sites: int) -> Strategy:
    """Flower's robust strategy for ``scfg`` (a ``conf/strategy`` option) over ``num_sites``.

    ``common`` holds the arguments every Flower FedAvg-family strategy takes (fractions,
    minimum nodes, weight key, metric aggregators).
    """
    name: str = scfg.name
    needed = min_replies(scfg)
    if needed > num_sites:
        f = _malicious(scfg)
        raise RobustConfigError(
            f"strategy={name} with num_malicious_nodes={f} needs at least {needed} sites per "
            f"round, but the federation has {num_sites}; lower strategy.num_malicious_nodes"
        )
    if name == "median":
        return FedMedian(**common)
    if name == "trimmed_mean":
        beta: float = scfg.beta
        if not 0.0 <= beta < 0.5:
            raise RobustConfigError(f"strategy.beta must be in [0, 0.5), got {beta}")
        return FedTrimmedAvg(**common, beta=beta)
    if name == "krum":
        return Krum(**common, num_malicious_nodes=_malicious(scfg))
    if name == "multikrum":
        select: int = scfg.num_nodes_to_select
        if not 1 <= select <= num_sites:
            raise RobustConfigError(
                f"strategy.num_nodes_to_select must be in [1, {num_sites}] (the sites), "
                f"got {select}"
            )
        return MultiKrum(**common, num_malicious_nodes=_malicious(scfg),
                         num_nodes_to_select=select)
    if name == "bulyan":
        return Bulyan(**common, num_malicious_nodes=_malicious(scfg))
    raise RobustConfigError(f"unknown robust strategy '{name}'; choose {', '.join(NAMES)}")
