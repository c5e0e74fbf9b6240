"""fedclinic ServerApp: composes the Hydra config from the run config and runs the experiment."""

from __future__ import annotations

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
        # An Exception, not SystemExit: Flower's flwr-serverapp/flwr-simulation catch only
        # Exception, and only then flush the run's last log lines and report the run as failed
        # (with this message as its status detail in `flwr ls`). SystemExit skipped both, so
        # `flwr run --stream` lost the final lines and waited for a heartbeat timeout.
        raise RunAborted(str(err)) from None


class RunAborted(RuntimeError):
    """The experiment could not run as configured (the reason was logged just before)."""
