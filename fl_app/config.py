"""Compose, validate and ship the Hydra experiment config.

The server composes the config once from the run config's ``overrides`` string (typed and
checked by the schema in fl_app/schema/) and sends it to the sites as a JSON string, so a
hospital never needs the yaml files.
"""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path
from typing import get_type_hints

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException, ValidationError

from fl_app.config_json import from_json, to_json
from fl_app.errors import ConfigError
from fl_app.schema import GROUPS, register

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
CONFIG_NAME = "config"

__all__ = ["ConfigError", "compose_config", "from_json", "resolve", "to_json"]

register()  # the typed schema of every config group option (fl_app/schema/)


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
    """Turn Hydra's/OmegaConf's composition error into one line naming the key and the fix."""
    text = " ".join(str(err).split())
    cause = err.__cause__ if isinstance(err.__cause__, OmegaConfBaseException) else err
    full_key = str(getattr(cause, "full_key", "") or "")
    groups = [p.name for p in CONF_DIR.iterdir() if p.is_dir()]
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        if key in groups and f"'{key}/" in text:
            choices = ", ".join(_group_options(key))
            return f"invalid override '{item}': '{key}' must be one of: {choices}"
        if key != full_key and f"'{key}'" not in text:
            continue
        others = [o for o in overrides if o != item]
        if isinstance(cause, ValidationError):
            return f"invalid override '{item}': {_expected(key, others)}: {_reason(cause)}"
        return f"invalid override '{item}': unknown key '{key}'. {_valid_keys(key, others)}"
    if full_key:
        return f"invalid config at '{full_key}': {_reason(cause)}"
    return f"invalid overrides {overrides}: {text}"


def _reason(err: Exception) -> str:
    """OmegaConf's own first line (e.g. "Value 'abc' of type 'str' could not be ...")."""
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _selected(overrides: list[str]) -> DictConfig | None:
    """The config the other overrides select (the options actually chosen), or None."""
    try:
        return _compose(overrides)
    except ConfigError:
        return None


def _expected(key: str, others: list[str]) -> str:
    """"'<key>' expects <type> (default <value>)", from the schema of the selected option."""
    cfg = _selected(others)
    parent, _, leaf = key.rpartition(".")
    node = cfg if cfg is None or not parent else OmegaConf.select(cfg, parent)
    schema = OmegaConf.get_type(node) if isinstance(node, DictConfig) else None
    hints = get_type_hints(schema) if dataclasses.is_dataclass(schema) else {}
    if leaf not in hints:
        return f"'{key}' has the wrong type"
    expected = hints[leaf]
    name = getattr(expected, "__name__", None) or str(expected).replace("typing.", "")
    default = OmegaConf.select(node, leaf, default=None)
    return f"'{key}' expects {name} (default {default!r})"


def _valid_keys(key: str, others: list[str]) -> str:
    """List the keys next to ``key`` in the config the other overrides select."""
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    cfg = _selected(others)
    node = cfg if cfg is None or not parent else OmegaConf.select(cfg, parent)
    if not isinstance(node, DictConfig):
        return ""
    keys = ", ".join(sorted(str(k) for k in node if k != "hydra"))
    return f"Valid keys{' under ' + repr(parent) if parent else ''}: {keys}"


def compose_config(overrides: str | list[str] | None = None) -> DictConfig:
    """Compose ``conf/config.yaml`` with Hydra overrides; raise ConfigError on a bad override.

    The schema (fl_app/schema/, Hydra structured configs) makes OmegaConf reject unknown
    group options, unknown keys, values of the wrong type and missing values.
    """
    items = parse_overrides(overrides)
    cfg = resolve(_compose(items))
    _reject_added_keys(cfg, items)
    return resumed_config(cfg, items) if cfg.resume else cfg


def resumed_config(cfg: DictConfig, items: list[str]) -> DictConfig:
    """``resume=<run folder>``: that run's own config.yaml (what it ran with), re-checked by
    the schema, with ``resume`` set. Other overrides would silently change a half-done run,
    so they are refused (``output_dir`` aside: the folder is given)."""
    others = [i for i in items if i.split("=", 1)[0].lstrip("+") not in ("resume", "output_dir")]
    if others:
        raise ConfigError(f"resume=<run folder> continues that run with its own config.yaml; "
                          f"drop the other overrides: {' '.join(others)}")
    folder = Path(cfg.resume).expanduser().resolve()
    saved = folder / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"resume={cfg.resume}: {saved} does not exist (give a run folder)")
    values = OmegaConf.load(saved)
    # the schemas of the options that run used (an option's `name` is its yaml file's name)
    base = resolve(_compose([f"{g}={values[g].name}" for g in GROUPS if g in values]))
    try:
        resumed = OmegaConf.merge(base, values, {"resume": str(folder)})
    except OmegaConfBaseException as err:
        raise ConfigError(f"resume={cfg.resume}: {saved} does not fit the schema: "
                          f"{_reason(err)}") from None
    assert isinstance(resumed, DictConfig)
    return resumed


def _reject_added_keys(cfg: DictConfig, items: list[str]) -> None:
    """Refuse keys a ``+key=value`` override added outside the schema.

    Hydra applies ``+`` with the struct flag off, so OmegaConf checks the composed config
    once more by merging its values into a fresh copy of each schema (root, then every group).
    """
    for prefix, node in [("", cfg), *((f"{g}.", cfg[g]) for g in GROUPS if g in cfg)]:
        try:
            schema = OmegaConf.structured(OmegaConf.get_type(node))
            OmegaConf.merge(schema, OmegaConf.to_container(node))
        except OmegaConfBaseException as err:
            key = prefix + str(getattr(err, "full_key", "") or "")
            item = next((i for i in items if i.lstrip("+").split("=", 1)[0] == key), key)
            raise ConfigError(
                f"invalid override '{item}': unknown key '{key}'. "
                f"{_valid_keys(key, [i for i in items if i != item])}"
            ) from None


def resolve(cfg: DictConfig) -> DictConfig:
    """Resolve interpolations once and drop Hydra's own section: what a run actually used.

    The result keeps its schema (typed, struct): reading ``cfg.task.lr`` gives a float.
    """
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(
            f"missing value for {', '.join(repr(k) for k in missing)}: set it in the yaml or "
            f"with an override ({missing[0]}=...)"
        )
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(_explain(err, [])) from None
    with open_dict(cfg):
        cfg.pop("hydra", None)
    return cfg
