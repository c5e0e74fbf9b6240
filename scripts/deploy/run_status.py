#!/usr/bin/env python3
"""Read a run's status from the SuperLink: did it complete, fail or stop, and why.

    python scripts/deploy/run_status.py fedclinic --run-id 2375956229528044397
    python scripts/deploy/run_status.py local            # the newest run

``flwr run`` exits 0 even when the ServerApp fails; the SuperLink knows better. This asks
it with ``flwr ls <connection> --run-id <id> --format json`` (the connection as in
``$FLWR_HOME/config.toml``), prints one line (``run <id>: finished:failed (<details>)``) and
exits 0 if the run finished and completed, 1 if it failed or was stopped, 3 while it is still
pending/starting/running, and 2 if the status cannot be read.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DeployError, fail, flower_env, flower_executable

EXIT_COMPLETED, EXIT_FAILED, EXIT_UNKNOWN, EXIT_NOT_FINISHED = 0, 1, 2, 3


@dataclass(frozen=True)
class RunStatus:
    """One run as the SuperLink reports it."""

    run_id: int
    status: str  # e.g. "finished:completed", "finished:failed", "running"
    details: str  # the SuperLink's reason for a failed/stopped run ("" if none)

    @property
    def finished(self) -> bool:
        """True once the run has ended (completed, failed or stopped)."""
        return self.status.startswith("finished")

    @property
    def ok(self) -> bool:
        """True only for a run that finished and completed."""
        return self.status == "finished:completed"

    def line(self) -> str:
        """``run <id>: <status>`` plus the details, on one line."""
        details = " ".join(self.details.split())  # one line, even for multi-line reasons
        return f"run {self.run_id}: {self.status}" + (f" ({details})" if details else "")


def run_status(connection: str, run_id: int | None = None, flwr_home: Path | None = None,
               timeout_s: float = 60.0) -> RunStatus:
    """Status of run ``run_id`` (the newest run if None) at ``connection``'s SuperLink.

    DeployError if the SuperLink cannot be asked or knows no such run.
    """
    env = flower_env()
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home.expanduser().resolve())
    command = [flower_executable("flwr"), "ls", connection, "--format", "json"]
    if run_id is not None:
        command += ["--run-id", str(run_id)]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True,
                              timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise DeployError(f"`flwr ls {connection}` did not answer within "
                          f"{timeout_s:.0f}s") from None
    try:  # Flower may print a notice before the JSON object
        reply = json.loads(done.stdout[done.stdout.index("{"):])
    except ValueError:
        reply = {}
    if done.returncode != 0 or not reply.get("success"):
        detail = reply.get("error-message") or (done.stdout + done.stderr).strip()
        raise DeployError(f"`flwr ls {connection}` failed: {detail}")
    runs = reply.get("runs") or []
    if run_id is not None:
        runs = [r for r in runs if int(r["run-id"]) == run_id]
    if not runs:
        which = f"run {run_id}" if run_id is not None else "any run"
        raise DeployError(f"the SuperLink of '{connection}' does not know {which}")
    newest = max(runs, key=lambda r: str(r.get("pending-at") or ""))
    return RunStatus(int(newest["run-id"]), str(newest["status"]),
                     str(newest.get("status-details") or "").strip())


def main(argv: list[str] | None = None) -> None:
    """Command line: print the run's status line; exit status as in the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("connection", help="connection name in $FLWR_HOME/config.toml")
    parser.add_argument("--run-id", type=int, default=None, help="default: the newest run")
    parser.add_argument("--flwr-home", type=Path, default=None,
                        help="Flower config folder (default: $FLWR_HOME or ~/.flwr)")
    args = parser.parse_args(argv)
    try:
        status = run_status(args.connection, args.run_id, args.flwr_home)
    except DeployError as err:
        fail(str(err), EXIT_UNKNOWN)
    print(status.line(), flush=True)
    if status.ok:
        raise SystemExit(EXIT_COMPLETED)
    raise SystemExit(EXIT_FAILED if status.finished else EXIT_NOT_FINISHED)


if __name__ == "__main__":
    main()
