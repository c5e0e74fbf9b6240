"""Hydra CLI: run an experiment in-process with Flower's simulation engine.

    python -m fl_app task=heart_disease task.data_dir=/abs/path strategy=fedprox
    python -m fl_app -m strategy=fedavg,fedprox seed=1,2,3      # a sweep, one run per job

Same config, same ServerApp/ClientApp code as ``flwr run .``; no SuperLink involved.
"""

from __future__ import annotations

import sys
from logging import ERROR
from typing import NoReturn

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
        # Recompose from the job's overrides: the same checks and messages as the ServerApp.
        cfg = compose_config(list(HydraConfig.get().overrides.task))
        run = simulate(cfg)
    except USER_ERRORS as err:
        fail(f"fedclinic: run failed: {err}")
    except Exception as err:  # a bug: keep its traceback in the log, the reason last
        log(ERROR, "fedclinic: unexpected error", exc_info=err)
        fail(f"fedclinic: run failed: {type(err).__name__}: {err}")
    print(f"fedclinic: run folder: {run.path}")
    return None


def fail(line: str) -> NoReturn:
    """Exit with status 1 and ``line`` (made one line) as the last line of the output."""
    sys.stdout.flush()
    print(" ".join(line.split()), file=sys.stderr, flush=True)
    raise SystemExit(1)


def main() -> None:
    """Entry point of ``python -m fl_app`` and the ``fedclinic`` command."""
    argv = sys.argv[1:]
    if not any(a.startswith("-") for a in argv):  # not a sweep (-m) nor a Hydra flag
        # Check the overrides first: one clear line, instead of Hydra's own error report.
        try:
            compose_config(argv)
        except ConfigError as err:
            fail(f"fedclinic: {err}")
    _run()


if __name__ == "__main__":
    main()
