"""Schemas of ``conf/secagg/*.yaml`` (values and comments live in the yaml files)."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING


@dataclass
class NoSecureAggregation:
    """conf/secagg/none.yaml; the base of every secure-aggregation option."""

    name: str = MISSING


@dataclass
class SecAggPlus(NoSecureAggregation):
    """conf/secagg/secaggplus.yaml (checked further by strategies/secaggplus.py)."""

    num_shares: int | None = MISSING
    reconstruction_threshold: int | None = MISSING
    clipping_range: float = MISSING
    quantization_range: int = MISSING
    modulus_range: int = MISSING
    timeout: float | None = MISSING


@dataclass
class Ckks(NoSecureAggregation):
    """conf/secagg/ckks.yaml (checked further by strategies/ckks.py)."""

    decryptors: int = MISSING
    public_context_sha256: str | None = MISSING
    verify_sum: bool = MISSING
    simulation_key_dir: str | None = MISSING


SCHEMAS: dict[str, type] = {
    "none_schema": NoSecureAggregation,
    "secaggplus_schema": SecAggPlus,
    "ckks_schema": Ckks,
}
