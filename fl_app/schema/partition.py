"""Schemas of ``conf/partition/*.yaml`` (values and comments live in the yaml files)."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING


@dataclass
class Partition:
    """conf/partition/iid.yaml and natural.yaml; the base of every partition option."""

    name: str = MISSING
    num_sites: int | None = MISSING


@dataclass
class Dirichlet(Partition):
    """conf/partition/dirichlet.yaml."""

    alpha: float = MISSING
    min_site_size: int = MISSING


@dataclass
class Quantity(Partition):
    """conf/partition/quantity.yaml."""

    alpha: float = MISSING
    sizes: list[float] | None = MISSING
    min_site_size: int = MISSING


SCHEMAS: dict[str, type] = {
    "partition_schema": Partition,
    "dirichlet_schema": Dirichlet,
    "quantity_schema": Quantity,
}
