"""fedclinic ServerApp: composes the Hydra config from the run config and runs the experiment."""

from __future__ import annotations

import logging
from logging import ERROR

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fl_app.config import ConfigError, compose_config
from fl_app.experiment import run_experiment
from fl_app.faults import FaultConfigError
from fl_app.sites import FederationError
from strategies.budget import PrivacyConfigError
from strategies.robust import RobustConfigError
from strategies.validation import ValidationConfigError
from tasks import DataError

app = ServerApp()

# Errors that mean "the experiment cannot run as configured": reported in one clear line.
USER_ERRORS = (
    ConfigError, FederationError, DataError, PrivacyConfigError, RobustConfigError,
    ValidationConfigError, FaultConfigError,
)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Compose the config from ``run_config['overrides']`` and run the experiment."""
    try:
        cfg = compose_config(str(context.run_config.get("overrides", "")))
        run_experiment(grid, cfg)
    except USER_ERRORS as err:
        log(ERROR, "fedclinic: %s", err)
        # An Exception (never SystemExit) in both runtimes, so Flower records the run as
        # finished:failed with this reason as its status details (`flwr ls`), which
        # scripts/flwr_local.sh and submit.py turn into a non-zero exit status. Deployment:
        # flwr-serverapp catches only Exception, flushes the run's last log lines and reports
        # the failure. Simulation: flwr-simulation gets it from the ServerApp thread.
        raise RunAborted(str(err)) from None


class RunAborted(RuntimeError):
    """The experiment could not run as configured (the reason was logged just before)."""


class _NoTracebackForRunAborted(logging.Filter):
    """Flower logs the ServerApp's exception with its traceback; for RunAborted the reason
    was already logged in one line, so the traceback is only noise (a user error, not a bug).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], RunAborted):
            record.exc_info, record.exc_text = None, None
        return True


logging.getLogger("flwr").addFilter(_NoTracebackForRunAborted())
