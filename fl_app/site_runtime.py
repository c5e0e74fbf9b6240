"""What a ClientApp needs before it can train: its site, its data, its device.

Site-local facts come only from the SuperNode's node_config: ``site-name`` and ``data-path``
in deployment, ``partition-id`` in simulation, and optionally ``device``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from flwr.app import Message
from omegaconf import DictConfig, OmegaConf

from fl_app.config_json import from_json
from tasks import DataError, SiteData, SiteRef, Task, get_task
from tasks.base import pick_device

CONFIG_KEY = "cfg"  # JSON of the resolved experiment config, in every ConfigRecord we send
STATS_KEY = "stats"  # JSON of the federated statistics (train/evaluate only)


def site_ref(cfg: DictConfig, task: Task, node_config: dict[str, Any]) -> SiteRef:
    """Which site this SuperNode serves, from its node_config."""
    if "data-path" in node_config or "site-name" in node_config:
        if "data-path" not in node_config:
            raise DataError("node_config has site-name but no data-path: start the SuperNode "
                            "with --node-config 'site-name=\"...\" data-path=\"/path\"'")
        path = Path(str(node_config["data-path"])).expanduser()
        if not path.exists():
            raise DataError(f"node_config data-path '{path}' does not exist on this SuperNode")
        name = str(node_config.get("site-name") or path.stem)
        if task.check_data_path is not None:
            try:
                task.check_data_path(path, name)
            except DataError as err:  # say which task wanted what, then what the path holds
                raise DataError(f"node_config data-path does not hold {task.name} data: "
                                f"{err}") from None
        return SiteRef(name=name, data_path=path)
    if "partition-id" in node_config:
        names = task.site_names(cfg)
        index = int(node_config["partition-id"])
        if index >= len(names):
            raise DataError(
                f"SuperNode with partition-id {index} has no site: task '{task.name}' has "
                f"{len(names)} sites ({', '.join(names)}); run with num-supernodes={len(names)}"
            )
        return SiteRef(name=names[index], index=index)
    raise DataError("node_config names no site: set data-path and site-name (deployment) "
                    "or run in simulation (partition-id)")


def device_for(cfg: DictConfig, node_config: dict[str, Any]) -> torch.device:
    """The SuperNode's ``device`` if set, else the config's (``auto`` = CUDA when present)."""
    requested = str(node_config.get("device", cfg.device))
    if requested.startswith("cuda") and not torch.cuda.is_available():
        where = "node_config" if "device" in node_config else "config"
        raise DataError(f"{where} device '{requested}' but CUDA is not available on this "
                        "SuperNode; use device=cpu or device=auto")
    try:
        return pick_device(requested)
    except RuntimeError:  # torch: "Expected one of cpu, cuda, ... device type"
        raise DataError(f"device '{requested}' is not a torch device; use cpu, cuda, cuda:N "
                        "or auto") from None


@lru_cache(maxsize=4)
def site_config(cfg_json: str) -> DictConfig:
    """The config a message carries, parsed once per process and read-only (it is shared by
    every message of the run: parsing it cost ~10 ms a message, i.e. seconds per round at
    hundreds of simulated sites)."""
    cfg = from_json(cfg_json)
    OmegaConf.set_readonly(cfg, True)
    return cfg


class _RunSites:
    """Every site's data for the most recent run config, loaded once per process.

    In simulation one ClientApp actor serves all sites in turn: a small LRU cache (the
    previous one kept 8) missed on every message from about 10 sites on, and each miss
    re-read and re-partitioned the data. Keeping every site of the current config costs at
    most about one copy of the task's data per process (the sites split it); a message with
    another config (a new run) drops the previous run's sites.
    """

    def __init__(self) -> None:
        self.cfg_json = ""
        self.sites: dict[tuple[Any, ...], SiteData] = {}

    def get(self, cfg_json: str, key: tuple[Any, ...], make: Callable[[], SiteData]
            ) -> SiteData:
        if cfg_json != self.cfg_json:
            self.cfg_json, self.sites = cfg_json, {}
        if key not in self.sites:
            self.sites[key] = make()
        return self.sites[key]


_SITES = _RunSites()


def _load(cfg_json: str, ref: SiteRef) -> SiteData:
    cfg = site_config(cfg_json)
    return _SITES.get(cfg_json, ("raw", ref), lambda: get_task(cfg.task.name).load_site(cfg, ref))


def _prepared(cfg_json: str, ref: SiteRef, stats_json: str) -> SiteData:
    def make() -> SiteData:
        stats = json.loads(stats_json) if stats_json else None
        return get_task(site_config(cfg_json).task.name).apply_statistics(
            _load(cfg_json, ref), stats)
    return _SITES.get(cfg_json, ("prepared", ref, stats_json), make)


class SiteSession:
    """The config, task, site and device of one incoming message."""

    def __init__(self, msg: Message, node_config: dict[str, Any]) -> None:
        record = msg.content["config"]
        self.cfg_json = str(record[CONFIG_KEY])
        self.stats_json = str(record.get(STATS_KEY, ""))
        self.cfg = site_config(self.cfg_json)
        self.task = get_task(self.cfg.task.name)
        self.ref = site_ref(self.cfg, self.task, node_config)
        self.device = device_for(self.cfg, node_config)

    def raw_site(self) -> SiteData:
        """The site's data before federated preprocessing (cached per process)."""
        return _load(self.cfg_json, self.ref)

    def site(self) -> SiteData:
        """The site's data after federated preprocessing (cached per process)."""
        return _prepared(self.cfg_json, self.ref, self.stats_json)
