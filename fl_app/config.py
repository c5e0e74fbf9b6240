"""Compose, validate and ship the Hydra experiment config.

The server composes the config once from the run config's ``overrides`` string, checks it,
and sends it to the sites as a JSON string, so a hospital never needs the yaml files.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
CONFIG_NAME = "config"


class ConfigError(ValueError):
    """A config that cannot be used, with a message meant for the person who wrote it."""


def parse_overrides(overrides: str | list[str] | None) -> list[str]:
    """Split an overrides string (``"task=x num_rounds=3"``) the way a shell would."""
    if overrides is None:
        return []
    if isinstance(overrides, str):
        return shlex.split(overrides)
    return list(overrides)


def _group_options(group: str) -> list[str]:
    folder = CONF_DIR / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def _compose(overrides: list[str]) -> DictConfig:
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            return compose(CONFIG_NAME, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(_explain(err, overrides)) from None
    finally:
        GlobalHydra.instance().clear()


def _explain(err: Exception, overrides: list[str]) -> str:
    """Turn Hydra's composition error into one message naming the key and valid choices."""
    text = str(err).strip()
    groups = [p.name for p in CONF_DIR.iterdir() if p.is_dir()]
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        if key in groups and f"'{key}/" in text:
            choices = ", ".join(_group_options(key))
            return f"invalid override '{item}': '{key}' must be one of: {choices}"
        if f"'{key}'" in text:
            return f"invalid override '{item}': unknown key '{key}'. {_valid_keys(key)}"
    return f"invalid overrides {overrides}: {text}"


def _valid_keys(key: str) -> str:
    """List the keys that exist next to ``key`` in the default config."""
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    try:
        node = _compose([]) if not parent else OmegaConf.select(_compose([]), parent)
    except ConfigError:
        return ""
    if not isinstance(node, DictConfig):
        return ""
    keys = ", ".join(sorted(str(k) for k in node if k != "hydra"))
    return f"Valid keys{' under ' + repr(parent) if parent else ''}: {keys}"


def _check_types(cfg: Any, reference: Any, overrides: list[str]) -> None:
    """Fail on an override whose value has another type than the default it replaces."""
    for item in overrides:
        if "=" not in item or item.startswith(("+", "~", "hydra.")):
            continue
        key = item.split("=", 1)[0]
        default = OmegaConf.select(reference, key, default=None)
        value = OmegaConf.select(cfg, key, default=None)
        if default is None or value is None or isinstance(default, (DictConfig, ListConfig)):
            continue
        if isinstance(default, bool) or isinstance(value, bool):
            ok = isinstance(default, bool) and isinstance(value, bool)
        elif isinstance(default, (int, float)):
            ok = isinstance(value, (int, float)) and not (
                isinstance(default, int) and isinstance(value, float)
            )
        else:
            ok = isinstance(value, type(default))
        if not ok:
            raise ConfigError(
                f"invalid override '{item}': '{key}' expects {type(default).__name__} "
                f"(default {default!r}), got {type(value).__name__} {value!r}"
            )


def compose_config(overrides: str | list[str] | None = None) -> DictConfig:
    """Compose ``conf/config.yaml`` with Hydra overrides; raise ConfigError on a bad override.

    Unknown group options and unknown keys are rejected by Hydra (the config is in struct
    mode); a value of the wrong type is rejected by comparing it with the default it replaces.
    """
    items = parse_overrides(overrides)
    cfg = _compose(items)
    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir()}
    group_choices = [i for i in items if i.split("=", 1)[0] in groups]
    reference = _compose(group_choices)
    _check_types(cfg, reference, items)
    return resolve(cfg)


def resolve(cfg: DictConfig) -> DictConfig:
    """Resolve interpolations once and drop Hydra's own section: what a run actually used."""
    container = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(container, dict)
    container.pop("hydra", None)
    resolved = OmegaConf.create(container)
    OmegaConf.set_struct(resolved, True)
    return resolved


def to_json(cfg: DictConfig) -> str:
    """Serialise a resolved config for the ConfigRecord sent to sites."""
    return json.dumps(OmegaConf.to_container(cfg, resolve=True), sort_keys=True)


def from_json(text: str) -> DictConfig:
    """Read back a config sent by the server."""
    cfg = OmegaConf.create(json.loads(text))
    OmegaConf.set_struct(cfg, True)
    return cfg
