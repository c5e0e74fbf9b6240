"""fedclinic ServerApp: composes the Hydra config from the run config and runs the experiment."""

from __future__ import annotations

import threading
from logging import ERROR

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fl_app.config import ConfigError, compose_config
from fl_app.experiment import run_experiment
from fl_app.sites import FederationError
from tasks import DataError

app = ServerApp()

# Errors that mean "the experiment cannot run as configured": reported in one clear line.
USER_ERRORS = (ConfigError, FederationError, DataError)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Compose the config from ``run_config['overrides']`` and run the experiment."""
    try:
        cfg = compose_config(str(context.run_config.get("overrides", "")))
        run_experiment(grid, cfg)
    except USER_ERRORS as err:
        log(ERROR, "fedclinic: %s", err)
        if threading.current_thread() is threading.main_thread():
            # Deployment: flwr-serverapp runs the ServerApp in its main thread and catches
            # only Exception; only then does it flush the run's last log lines and report the
            # run as failed. SystemExit there ended the process at once: `flwr run --stream`
            # lost the lines above and waited ~1 min for a heartbeat timeout. (Flower prints
            # this exception's short traceback after our one-line message.)
            raise RunAborted(str(err)) from None
        # Simulation runs the ServerApp in a thread: SystemExit ends it quietly, and
        # flwr-simulation then flushes the logs itself.
        raise SystemExit(1) from None


class RunAborted(RuntimeError):
    """The experiment could not run as configured (the reason was logged just before)."""
