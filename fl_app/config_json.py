"""The resolved experiment config as it travels to the sites: JSON, read back as a DictConfig.

Kept apart from fl_app/config.py (Hydra composition and its schema registry), so a site's
ClientApp process, which only reads the config the server sent, never imports Hydra.
"""

from __future__ import annotations

import json

from omegaconf import DictConfig, OmegaConf


def to_json(cfg: DictConfig) -> str:
    """Serialise a resolved config for the ConfigRecord sent to sites."""
    return json.dumps(OmegaConf.to_container(cfg, resolve=True), sort_keys=True)


def from_json(text: str) -> DictConfig:
    """Read back a config sent by the server (validated and typed there by the schema)."""
    cfg = OmegaConf.create(json.loads(text))
    OmegaConf.set_struct(cfg, True)
    return cfg
