"""Run an experiment in-process with Flower's simulation engine (no SuperLink, no CLI)."""

from __future__ import annotations

import logging
import os
import sys

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from omegaconf import DictConfig

from fl_app.client_app import app as client_app
from fl_app.config import ConfigError, compose_config
from fl_app.experiment import run_experiment
from fl_app.run_folder import RunFolder
from fl_app.sites import expected_num_sites
from tasks import get_task

DEFAULT_SIMULATED_SITES = 3


def simulate(cfg: DictConfig, num_cpus: int | None = None) -> RunFolder:
    """Simulate one SuperNode per site for the resolved ``cfg``; return the run folder."""
    from flwr.simulation import run_simulation  # imports Ray: keep it off the module path

    num_sites = simulated_sites(cfg)
    folders: list[RunFolder] = []
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        folders.append(run_experiment(grid, cfg))

    cpus = num_cpus or os.cpu_count() or 1
    run_simulation(
        server_app=server,
        client_app=client_app,
        num_supernodes=num_sites,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": cpus, "include_dashboard": False,
                          "logging_level": logging.WARNING},
        },
    )
    if not folders:
        raise RuntimeError("the simulated ServerApp did not finish; see the log above")
    return folders[0]


def simulated_sites(cfg: DictConfig) -> int:
    """One simulated SuperNode per site of the task.

    When the task's sites are known (natural sites, or ``partition.num_sites`` set) every
    site gets one, even with ``min_sites`` lower: min_sites is how many must stay connected,
    not how many exist. Else ``min_sites`` or the default.
    """
    task = get_task(cfg.task.name)
    if task.natural_sites or cfg.partition.get("num_sites") is not None:
        return len(task.site_names(cfg))
    return expected_num_sites(cfg, task) or DEFAULT_SIMULATED_SITES


def num_supernodes(overrides: str) -> int:
    """How many simulated SuperNodes an experiment needs (one per site)."""
    return simulated_sites(compose_config(overrides))


if __name__ == "__main__":
    # `python -m fl_app.simulation "<overrides>"` prints the SuperNodes needed (used by
    # scripts/flwr_local.sh); a bad override ends here with one clear line.
    try:
        print(num_supernodes(sys.argv[1] if len(sys.argv) > 1 else ""))
    except ConfigError as err:
        sys.exit(f"fedclinic: {err}")
