#!/usr/bin/env python3
"""Submit a fedclinic run to the consortium's SuperLink.

    python scripts/deploy/submit.py --connection fedclinic --stream \\
        --overrides "task=heart_disease min_sites=3 num_rounds=20 output_dir=/srv/fedclinic/runs"
    python scripts/deploy/submit.py --connection fedclinic-tunnel --ssh-tunnel admin@centre \\
        --overrides "..."         # from a workstation: over `ssh -L 9093:127.0.0.1:9091`

The SuperLink's Control API listens only on the coordinating centre's loopback (the public
port admits SuperNodes only), so run this on that host with a connection to
``127.0.0.1:<link-port>``, or elsewhere with ``--ssh-tunnel [user@]host``: it holds
``ssh -N -L 127.0.0.1:<tunnel-port>:127.0.0.1:<link-port> host`` open while ``flwr`` runs, and
the connection must then point at ``127.0.0.1:<tunnel-port>`` (the SuperLink's certificate
names 127.0.0.1). Before submitting it prints the app's FAB SHA-256 (Flower's own build of the
app folder, byte for byte what ``flwr run`` sends); the run folder's summary.json records the
hash the ServerApp ran (``app.fab_hash``), for hospitals to compare.

It runs ``flwr run <app> <connection> --run-config 'overrides="..."' [--stream]`` with runtime
dependency installation disabled. ``output_dir`` must be an absolute path on the SuperLink's
machine: the ServerApp runs there, in the SuperLink's working directory.
Without ``--stream`` it prints the run id; follow it with ``flwr log <run-id> <connection>``
and list runs with ``flwr ls <connection>`` (or ``run_status.py <connection> --run-id N``).

With ``--stream`` it follows the run's log and then asks the SuperLink how the run ended
(``flwr run`` itself exits 0 for a failed run): exit status 0 only for a completed run, 1 for a
failed or stopped one, whose reason is the last line (``error: run <id> failed: <reason>``).
Flower's traceback of the ServerApp's exception and its "Exit Code: 201" block are left out
of the stream: the reason is the line fedclinic logged, and again the last line.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DeployError, fail, flower_env, flower_executable, stop_process
from run_status import RunStatus, run_status

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


STARTED = re.compile(r"Successfully started run (\d+)")
# A Flower log line starts with its level (colours optional): "INFO :", "\x1b[91mERROR \x1b[0m:"
LOG_LINE = re.compile(r"^(\x1b\[[0-9;]*m)?(DEBUG|INFO|WARNING|ERROR|CRITICAL)\s*(\x1b\[0m)?\s*:")
EXIT_CODE = re.compile(r"Exit Code: \d+")
SERVERAPP_PREFIX = "ServerApp failed with exception: "


def readable(lines: Iterable[str]) -> Iterator[str]:
    """The run's log without Flower's report of the ServerApp's exception.

    Dropped: "ServerApp raised an exception" with the traceback after it, and the "Exit Code:
    201 / An unhandled exception occurred ..." block, each up to the next log line. fedclinic
    logs its one-line reason before raising, so nothing the operator needs is lost.
    """
    skipping = False
    for line in lines:
        if skipping and LOG_LINE.match(line) and not EXIT_CODE.search(line):
            skipping = False
        if "raised an exception" in line or EXIT_CODE.search(line) or \
                line.startswith("Traceback (most recent call last):"):
            skipping = True
        if not skipping:
            yield line


def failure_reason(status: RunStatus) -> str:
    """The run's failure in one line: the ServerApp's exception message, first line."""
    details = status.details.removeprefix(SERVERAPP_PREFIX).strip()
    first = next((x.strip() for x in details.splitlines() if x.strip()), "")
    return first or f"the SuperLink reports {status.status} without details"


def final_status(connection: str, run_id: int, flwr_home: Path | None,
                 wait_s: float = 30.0) -> RunStatus:
    """The run's status once the SuperLink marks it finished (the log ends slightly before)."""
    deadline = time.monotonic() + wait_s
    while True:
        status = run_status(connection, run_id, flwr_home)
        if status.finished or time.monotonic() > deadline:
            return status
        time.sleep(1.0)


def stream_and_judge(command: list[str], env: dict[str, str], connection: str,
                     flwr_home: Path | None, timeout: float | None) -> int:
    """Run ``flwr run --stream``, echo its readable log; exit status from the run's status."""
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace")
    timer = threading.Timer(timeout, proc.kill) if timeout is not None else None
    if timer is not None:
        timer.start()
    run_id: int | None = None

    def lines() -> Iterator[str]:
        nonlocal run_id
        assert proc.stdout is not None
        for line in proc.stdout:
            if run_id is None and (match := STARTED.search(line)):
                run_id = int(match.group(1))
            yield line

    for line in readable(lines()):
        sys.stdout.write(line)
        sys.stdout.flush()
    rc = proc.wait()
    if timer is not None and not timer.is_alive():  # it fired: the run may go on
        fail(f"no end of the run within {timeout:.0f}s; it may still go on: see "
             f"`flwr ls {connection}`", 124)
    if timer is not None:
        timer.cancel()
    if run_id is None:
        fail(f"`flwr run` did not start a run (exit status {rc}); see its output above")
    assert run_id is not None
    try:
        status = final_status(connection, run_id, flwr_home)
    except DeployError as err:
        fail(f"run {run_id}: cannot read its status from the SuperLink: {err}", 2)
    if status.ok:
        print(f"run {run_id}: completed", flush=True)
        return 0
    if not status.finished:
        fail(f"run {run_id} is still {status.status} after its log ended; see "
             f"`flwr ls {connection} --run-id {run_id}`", 3)
    verb = "was stopped" if status.status.endswith("stopped") else "failed"
    fail(f"run {run_id} {verb}: {failure_reason(status)}", 1)
    return 1


def fab_sha256(app: Path) -> str:
    """SHA-256 of the FAB that ``flwr run`` builds from ``app`` (Flower's deterministic
    builder: fixed timestamps, the app's include/exclude rules)."""
    from flwr.cli.build import build_fab_from_disk  # imported late: Flower is slow to import

    return hashlib.sha256(build_fab_from_disk(app)).hexdigest()


def tunnel_command(host: str, tunnel_port: int, link_port: int) -> list[str]:
    """``ssh`` forwarding local ``127.0.0.1:tunnel_port`` to the centre's loopback SuperLink."""
    return ["ssh", "-N", "-o", "ExitOnForwardFailure=yes", "-o", "ServerAliveInterval=30",
            "-L", f"127.0.0.1:{tunnel_port}:127.0.0.1:{link_port}", host]


@contextlib.contextmanager
def ssh_tunnel(host: str, tunnel_port: int, link_port: int,
               timeout_s: float = 30.0) -> Iterator[None]:
    """Hold an SSH tunnel open for the ``with`` block; DeployError if it does not come up."""
    command = tunnel_command(host, tunnel_port, link_port)
    print(shlex.join(command), flush=True)
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise DeployError(f"ssh to {host} ended with status {proc.returncode} before "
                                  f"the tunnel came up (is 127.0.0.1:{tunnel_port} in use?)")
            with contextlib.suppress(OSError), \
                    socket.create_connection(("127.0.0.1", tunnel_port), timeout=1):
                break
            if time.monotonic() > deadline:
                raise DeployError(f"the SSH tunnel to {host} did not open within "
                                  f"{timeout_s:.0f}s")
            time.sleep(0.3)
        yield
    finally:
        stop_process(proc)


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
    parser.add_argument("--ssh-tunnel", metavar="[USER@]HOST", default=None,
                        help="reach the centre's loopback Control API over SSH")
    parser.add_argument("--tunnel-port", type=int, default=9093,
                        help="local end of the tunnel (default 9093; the connection's port)")
    parser.add_argument("--link-port", type=int, default=9091,
                        help="the SuperLink's loopback port on the centre (default 9091)")
    args = parser.parse_args(argv)
    try:
        check_output_dir(args.overrides)
        command = run_command(args.app, args.connection, args.overrides, args.stream)
        fab_hash = fab_sha256(args.app)
    except (DeployError, ValueError) as err:
        fail(str(err))
    env = flower_env()
    if args.flwr_home is not None:
        env["FLWR_HOME"] = str(args.flwr_home.expanduser().resolve())
    print(f"app {args.app.resolve()}: FAB sha256 {fab_hash}", flush=True)
    tunnel = (ssh_tunnel(args.ssh_tunnel, args.tunnel_port, args.link_port)
              if args.ssh_tunnel else contextlib.nullcontext())
    print(shlex.join(command), flush=True)
    try:
        with tunnel:  # open for the submission and for reading the run's status
            if args.stream:
                raise SystemExit(stream_and_judge(command, env, args.connection,
                                                  args.flwr_home, args.timeout))
            done = subprocess.run(command, env=env, timeout=args.timeout, check=False)
    except DeployError as err:
        fail(str(err), 3)
    except subprocess.TimeoutExpired:
        fail(f"no answer within {args.timeout:.0f}s; the run may still go on: see "
             f"`flwr ls {args.connection}`", 124)
    raise SystemExit(done.returncode)


if __name__ == "__main__":
    main()
