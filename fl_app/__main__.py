"""Hydra CLI: run an experiment in-process with Flower's simulation engine.

    python -m fl_app task=heart_disease task.data_dir=/abs/path strategy=fedprox
    python -m fl_app -m strategy=fedavg,fedprox seed=1,2,3      # a sweep, one run per job

Same config, same ServerApp/ClientApp code as ``flwr run .``; no SuperLink involved.
"""

from __future__ import annotations

import sys
from logging import ERROR

import hydra
from flwr.common.logger import log
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fl_app.config import CONF_DIR, CONFIG_NAME, ConfigError, compose_config
from fl_app.server_app import USER_ERRORS


@hydra.main(config_path=str(CONF_DIR), config_name=CONFIG_NAME, version_base=None)
def _run(_: DictConfig) -> float | None:
    from fl_app.simulation import simulate  # imports Ray only once the config is valid

    try:
        # Recompose from the job's overrides: same validation (types) as the ServerApp path.
        cfg = compose_config(list(HydraConfig.get().overrides.task))
        run = simulate(cfg)
    except USER_ERRORS as err:
        log(ERROR, "fedclinic: %s", err)
        sys.exit(1)
    print(f"fedclinic: run folder: {run.path}")
    return None


def main() -> None:
    """Entry point of ``python -m fl_app`` and the ``fedclinic`` command."""
    try:
        _run()
    except ConfigError as err:  # pragma: no cover - hydra exits itself on most errors
        print(f"fedclinic: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
