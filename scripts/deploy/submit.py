#!/usr/bin/env python3
"""Submit a fedclinic run to the consortium's SuperLink.

    python scripts/deploy/submit.py --connection fedclinic --stream \\
        --overrides "task=heart_disease min_sites=3 num_rounds=20 output_dir=/srv/fedclinic/runs"

runs ``flwr run <app> <connection> --run-config 'overrides="..."' [--stream]`` with runtime
dependency installation disabled. ``output_dir`` must be an absolute path on the SuperLink's
machine: the ServerApp runs there, in the SuperLink's working directory.
Without ``--stream`` it prints the run id; follow it with ``flwr log <run-id> <connection>``
and list runs with ``flwr ls <connection>``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path, PurePosixPath

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DeployError, fail, flower_env, flower_executable

REPO = Path(__file__).resolve().parents[2]


def check_output_dir(overrides: str) -> None:
    """DeployError unless the overrides set an absolute ``output_dir``."""
    values = [item.split("=", 1)[1] for item in shlex.split(overrides)
              if item.startswith("output_dir=")]
    if not values:
        raise DeployError(
            "set output_dir=/absolute/path in --overrides: the ServerApp runs inside the "
            "SuperLink and would otherwise write under the SuperLink's working directory"
        )
    if not PurePosixPath(values[-1]).is_absolute():
        raise DeployError(f"output_dir={values[-1]} must be absolute (a path on the SuperLink's "
                          "machine)")


def run_command(app: Path, connection: str, overrides: str, stream: bool) -> list[str]:
    """The ``flwr run`` command line."""
    command = [flower_executable("flwr"), "run", str(app), connection,
               "--run-config", f"overrides={json.dumps(overrides)}"]
    return command + (["--stream"] if stream else ["--format", "json"])


def main(argv: list[str] | None = None) -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connection", default="fedclinic", help="connection name")
    parser.add_argument("--overrides", required=True, help="Hydra overrides of the experiment")
    parser.add_argument("--app", type=Path, default=REPO, help="app folder (default: this repo)")
    parser.add_argument("--flwr-home", type=Path, default=None,
                        help="Flower config folder (default: $FLWR_HOME or ~/.flwr)")
    parser.add_argument("--stream", action="store_true", help="follow the run's log until it ends")
    parser.add_argument("--timeout", type=float, default=None, help="give up after N seconds")
    args = parser.parse_args(argv)
    try:
        check_output_dir(args.overrides)
        command = run_command(args.app, args.connection, args.overrides, args.stream)
    except DeployError as err:
        fail(str(err))
    env = flower_env()
    if args.flwr_home is not None:
        env["FLWR_HOME"] = str(args.flwr_home.expanduser().resolve())
    print(shlex.join(command), flush=True)
    try:
        done = subprocess.run(command, env=env, timeout=args.timeout, check=False)
    except subprocess.TimeoutExpired:
        fail(f"no answer within {args.timeout:.0f}s; the run may still go on: see "
             f"`flwr ls {args.connection}`", 124)
    raise SystemExit(done.returncode)


if __name__ == "__main__":
    main()
