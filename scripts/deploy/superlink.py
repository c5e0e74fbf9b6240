#!/usr/bin/env python3
"""Start (or stop) the coordinating centre: the SuperLink on loopback behind a TLS proxy that
admits only the Fleet API.

    python scripts/deploy/superlink.py --certs certs/ --state-dir /srv/fedclinic/state \\
        [--host 0.0.0.0] [--port 9092] [--link-port 9091] [--workdir /srv/fedclinic]
    python scripts/deploy/superlink.py --stop --state-dir /srv/fedclinic/state

One command starts, supervises and stops three processes together:

* ``flower-superlink`` on ``127.0.0.1:<link-port>`` only: TLS (the same consortium
  certificate; Flower requires TLS for SuperNode authentication, and it keeps the loopback hop
  private from other local users), ``--enable-supernode-auth``, state in
  ``<state-dir>/state.db``, runtime dependency installation off, ``--isolation process`` with
  the SuperExec shared secret ``<state-dir>/superexec.secret`` (generated, 0600).
* ``flower-superexec`` with the same secret: it starts one ``flwr-serverapp`` per run, in
  ``--workdir`` (default: the state folder; a relative ``output_dir`` lands there).
* ``caddy`` on ``--host:--port`` (the public address hospitals dial): terminates TLS with
  ``server.pem`` and forwards ``POST /v1/fleet/...`` only; everything else gets 403
  (front_door.py writes ``<state-dir>/Caddyfile`` from the same certificate paths).

The Control API (``flwr run/ls/log``, ``flwr supernode register``) and the Runtime API are
reachable only on the centre's loopback: run ``flwr``/``submit.py``/``node_keys.py`` there, or
through an SSH tunnel (``submit.py --ssh-tunnel``). PIDs go to ``<state-dir>/superlink.pids``;
SIGTERM/SIGINT (or ``--stop``) stops all three; if one of them dies, the others are stopped
too and the exit status is non-zero. Everything it creates is owner-only (umask 077; state
files 0600), and Flower's telemetry and update check are off.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    DeployError,
    ensure_secret,
    fail,
    flower_env,
    flower_executable,
    private_dir,
    write_private,
)
from front_door import CADDYFILE, caddy_executable, caddyfile
from pki import CA_CERT, SERVER_CERT, SERVER_KEY, check_server_cert

LOOPBACK = "127.0.0.1"
STATE_DB, SECRET_FILE, PID_FILE = "state.db", "superexec.secret", "superlink.pids"
# SQLite's companion files of state.db; they hold run messages too.
STATE_FILES = (STATE_DB, f"{STATE_DB}-wal", f"{STATE_DB}-shm", f"{STATE_DB}-journal")
START_TIMEOUT_S, STOP_GRACE_S = 60.0, 20.0


def superlink_command(
    certs: Path, state_dir: Path, link_port: int, secret: Path, log_file: Path | None = None
) -> list[str]:
    """The ``flower-superlink`` command line: loopback only, TLS, node auth, own SuperExec."""
    certs = certs.expanduser().resolve()
    command = [
        flower_executable("flower-superlink"),
        "--ssl-ca-certfile", str(certs / CA_CERT),
        "--ssl-certfile", str(certs / SERVER_CERT),
        "--ssl-keyfile", str(certs / SERVER_KEY),
        "--enable-supernode-auth",
        "--database", str(state_dir.expanduser().resolve() / STATE_DB),
        "--disable-runtime-dependency-installation",
        # process isolation: the SuperExec is ours, started with the shared secret (in the
        # default subprocess mode Flower ignores the secret)
        "--isolation", "process",
        "--superexec-auth-secret-file", str(secret),
        "--host", LOOPBACK,
        "--port", str(link_port),
    ]
    if log_file is not None:
        command += ["--log-file", str(log_file.expanduser().resolve())]
    return command


def superexec_command(certs: Path, link_port: int, secret: Path, parent_pid: int) -> list[str]:
    """The ``flower-superexec`` that runs the ServerApps, authenticated with the secret."""
    return [
        flower_executable("flower-superexec"),
        "--runtime-api-address", f"{LOOPBACK}:{link_port}",
        "--root-certificates", str(certs.expanduser().resolve() / CA_CERT),
        "--superexec-auth-secret-file", str(secret),
        "--parent-pid", str(parent_pid),
    ]


def proxy_command(config: Path) -> list[str]:
    """The ``caddy run`` command for the generated Caddyfile."""
    return [caddy_executable(), "run", "--adapter", "caddyfile", "--config", str(config)]


def secure_state_files(state_dir: Path) -> None:
    """Create ``state.db`` empty with mode 0600 if missing (SQLite keeps the mode, and gives
    its -wal/-shm/-journal files the same), and narrow existing state files to 0600."""
    database = state_dir / STATE_DB
    if not database.exists():
        os.close(os.open(database, os.O_WRONLY | os.O_CREAT, 0o600))
    for name in STATE_FILES:
        with contextlib.suppress(FileNotFoundError):
            os.chmod(state_dir / name, 0o600)


def _tls_answers(port: int, ca: Path) -> bool:
    context = ssl.create_default_context(cafile=str(ca))
    try:
        with socket.create_connection((LOOPBACK, port), timeout=2) as raw, \
                context.wrap_socket(raw, server_hostname=LOOPBACK):
            return True
    except OSError:
        return False


def _tcp_answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def _wait_until(what: str, ready, procs: dict[str, subprocess.Popen[bytes]]) -> None:
    """Poll ``ready()``; DeployError if a started process exits or time runs out."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready():
        for name, proc in procs.items():
            if proc.poll() is not None:
                raise DeployError(f"{name} exited with status {proc.returncode} while starting "
                                  "(its log is above)")
        if time.monotonic() > deadline:
            raise DeployError(f"{what} did not answer within {START_TIMEOUT_S:.0f}s")
        time.sleep(0.3)


def _stop(procs: dict[str, subprocess.Popen[bytes]]) -> None:
    """Stop the proxy first (no new traffic), then the SuperExec's group and the SuperLink:
    SIGTERM, then SIGKILL after a grace period."""
    order = [n for n in ("proxy", "superexec", "superlink") if n in procs]
    for name in order:
        proc = procs[name]
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                if name == "superexec":  # its own group: the flwr-serverapp of a run too
                    os.killpg(proc.pid, signal.SIGTERM)
                else:
                    proc.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for name in order:
        proc = procs[name]
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"{name} (pid {proc.pid}) did not stop within {STOP_GRACE_S:.0f}s: killing it",
                  flush=True)
            proc.kill()
            proc.wait(timeout=10)
    if "superexec" in procs:  # a ServerApp the SuperExec left behind (same process group)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(procs["superexec"].pid, signal.SIGKILL)


def run(args: argparse.Namespace) -> int:
    """Start the three processes, supervise them, stop them together; return the exit code."""
    certs = args.certs.expanduser().resolve()
    state_dir = private_dir(args.state_dir)
    workdir = (args.workdir or args.state_dir).expanduser()
    workdir.mkdir(parents=True, exist_ok=True)
    workdir = workdir.resolve()
    secret = ensure_secret(state_dir / SECRET_FILE)
    secure_state_files(state_dir)
    config = state_dir / CADDYFILE
    write_private(config, caddyfile(
        ca_cert=certs / CA_CERT, server_cert=certs / SERVER_CERT, server_key=certs / SERVER_KEY,
        public_host=args.host, public_port=args.port, link_port=args.link_port,
        storage=state_dir / "caddy",
    ).encode())
    link = superlink_command(certs, state_dir, args.link_port, secret, args.log_file)
    proxy = proxy_command(config)
    print(f"working directory: {workdir}", flush=True)
    if args.dry_run:
        for command in (link, superexec_command(certs, args.link_port, secret, 0), proxy):
            print(" ".join(command), flush=True)
        return 0

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    env = flower_env()
    # Caddy keeps its data (locks, autosave) under the state folder, not in $HOME.
    proxy_env = {**env, "XDG_DATA_HOME": str(state_dir / "caddy"),
                 "XDG_CONFIG_HOME": str(state_dir / "caddy")}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    code = 0
    try:
        print(" ".join(link), flush=True)
        procs["superlink"] = subprocess.Popen(link, cwd=workdir, env=env)
        _wait_until(f"the SuperLink on {LOOPBACK}:{args.link_port}",
                    lambda: _tls_answers(args.link_port, certs / CA_CERT), procs)
        superexec = superexec_command(certs, args.link_port, secret, procs["superlink"].pid)
        print(" ".join(superexec), flush=True)
        procs["superexec"] = subprocess.Popen(superexec, cwd=workdir, env=env,
                                              start_new_session=True)
        if args.proxy == "run":
            print(" ".join(proxy), flush=True)
            procs["proxy"] = subprocess.Popen(proxy, cwd=state_dir, env=proxy_env)
            probe_host = LOOPBACK if args.host in ("0.0.0.0", "::", "") else args.host
            _wait_until(f"the proxy on {args.host}:{args.port}",
                        lambda: _tcp_answers(probe_host, args.port), procs)
        else:  # a separate container sharing this network namespace runs it (compose.yaml)
            print(f"proxy not started here (--proxy external): run `{' '.join(proxy)}` in "
                  "this host's network namespace", flush=True)
        write_private(state_dir / PID_FILE, json.dumps(
            {"supervisor": os.getpid(), **{n: p.pid for n, p in procs.items()}}).encode())
        print(f"fedclinic: front door https://{args.host}:{args.port} serves the Fleet API only; "
              f"SuperLink (Control API) on https://{LOOPBACK}:{args.link_port} on this host "
              f"only; PIDs in {state_dir / PID_FILE}", flush=True)
        while not stop.wait(0.5):
            ended = [n for n, p in procs.items() if p.poll() is not None]
            if ended:
                print(f"error: {ended[0]} exited with status {procs[ended[0]].returncode}; "
                      "stopping the others", file=sys.stderr, flush=True)
                code = 1
                break
    except DeployError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        code = 1
    finally:
        _stop(procs)
        secure_state_files(state_dir)
        (state_dir / PID_FILE).unlink(missing_ok=True)
    print("fedclinic: proxy, SuperLink and SuperExec stopped", flush=True)
    return code


def stop_running(state_dir: Path, timeout_s: float = 60.0) -> None:
    """``--stop``: SIGTERM the supervisor named in the PID file and wait until all are gone."""
    pid_file = state_dir.expanduser() / PID_FILE
    try:
        pids = json.loads(pid_file.read_text())
    except (OSError, ValueError):
        raise DeployError(f"{pid_file} not found or unreadable: is the SuperLink running with "
                          f"--state-dir {state_dir}?") from None
    try:
        os.kill(int(pids["supervisor"]), signal.SIGTERM)
    except ProcessLookupError:
        raise DeployError(f"process {pids['supervisor']} from {pid_file} is not running") from None
    deadline = time.monotonic() + timeout_s
    while any(_running(int(p)) for p in pids.values()):
        if time.monotonic() > deadline:
            raise DeployError(f"still running after {timeout_s:.0f}s: {pids}")
        time.sleep(0.3)
    print(f"stopped {', '.join(f'{n} ({p})' for n, p in pids.items())}")


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def main(argv: list[str] | None = None) -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--certs", type=Path, default=None,
                        help="folder with ca.crt, server.pem, server.key (pki.py); required "
                             "unless --stop")
    parser.add_argument("--state-dir", type=Path, required=True,
                        help="persistent folder: state.db (registered SuperNodes, runs), the "
                             "SuperExec secret, the Caddyfile, the PID file")
    parser.add_argument("--host", default="0.0.0.0",
                        help="public address the proxy binds (default 0.0.0.0)")
    parser.add_argument("--port", type=int, default=9092,
                        help="public HTTPS port, Fleet API only (default 9092)")
    parser.add_argument("--link-port", type=int, default=9091,
                        help="the SuperLink's port on 127.0.0.1: Control API for this host and "
                             "SSH tunnels (default 9091)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="working directory of the SuperLink and its ServerApp "
                             "(default: --state-dir); put the site registry here")
    parser.add_argument("--log-file", type=Path, default=None, help="also log to this file")
    parser.add_argument("--proxy", choices=("run", "external"), default="run",
                        help="run: start Caddy here (default); external: only write the "
                             "Caddyfile, for a proxy container sharing this network namespace")
    parser.add_argument("--dry-run", action="store_true",
                        help="write the secret, state.db and Caddyfile, print the commands, "
                             "start nothing")
    parser.add_argument("--stop", action="store_true",
                        help="stop the running proxy, SuperLink and SuperExec of --state-dir")
    args = parser.parse_args(argv)
    os.umask(0o077)  # state.db, run folders, logs: owner-only
    try:
        if args.stop:
            stop_running(args.state_dir)
            return
        if args.certs is None:
            raise DeployError("--certs is required (folder with ca.crt, server.pem, server.key)")
        if args.port == args.link_port:
            raise DeployError("--port (public) and --link-port (loopback) must differ")
        # the proxy and the SuperExec dial the SuperLink on 127.0.0.1: the certificate must
        # name it (pki.py server adds it)
        for line in check_server_cert(args.certs.expanduser(), [], [LOOPBACK]):
            print(line, flush=True)
    except DeployError as err:
        fail(str(err))
    raise SystemExit(run(args))


if __name__ == "__main__":
    main()
