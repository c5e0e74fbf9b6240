"""Schemas of ``conf/personalize/*.yaml`` (values and comments live in the yaml files)."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING


@dataclass
class NoPersonalization:
    """conf/personalize/none.yaml; the base of every personalisation option."""

    name: str = MISSING


@dataclass
class Finetune(NoPersonalization):
    """conf/personalize/finetune.yaml."""

    epochs: int = MISSING
    params: str = MISSING
    lr: float | None = MISSING


@dataclass
class Ditto(NoPersonalization):
    """conf/personalize/ditto.yaml."""

    lam: float = MISSING
    epochs: int | None = MISSING
    lr: float | None = MISSING


SCHEMAS: dict[str, type] = {
    "none_schema": NoPersonalization,
    "finetune_schema": Finetune,
    "ditto_schema": Ditto,
}
