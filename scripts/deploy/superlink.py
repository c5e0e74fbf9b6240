#!/usr/bin/env python3
"""Start the consortium's SuperLink: TLS, SuperNode authentication, persistent state.

    python scripts/deploy/superlink.py --certs certs/ --state-dir /srv/fedclinic/state \\
        [--host 0.0.0.0] [--port 9092] [--workdir /srv/fedclinic]

Checks the certificates first (signed by the CA, key matches, not expired), then replaces
itself with::

    flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key
        --enable-supernode-auth --database <state-dir>/state.db
        --disable-runtime-dependency-installation --host <host> --port <port>

One HTTPS port serves the Fleet API (SuperNodes), the Control API (``flwr`` CLI) and the
Runtime API. The ServerApp runs in a ``flwr-serverapp`` child process whose working directory
is ``--workdir`` (default: the state folder); a relative ``output_dir`` resolves there, so
pass an absolute one in ``--run-config``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DeployError, fail, flower_env, flower_executable
from pki import CA_CERT, SERVER_CERT, SERVER_KEY, check_server_cert


def superlink_command(
    certs: Path, state_dir: Path, host: str, port: int, log_file: Path | None = None
) -> list[str]:
    """The ``flower-superlink`` command line for this deployment."""
    certs = certs.expanduser().resolve()
    command = [
        flower_executable("flower-superlink"),
        "--ssl-ca-certfile", str(certs / CA_CERT),
        "--ssl-certfile", str(certs / SERVER_CERT),
        "--ssl-keyfile", str(certs / SERVER_KEY),
        "--enable-supernode-auth",
        "--database", str(state_dir.expanduser().resolve() / "state.db"),
        "--disable-runtime-dependency-installation",
        "--host", host,
        "--port", str(port),
    ]
    if log_file is not None:
        command += ["--log-file", str(log_file.expanduser().resolve())]
    return command


def main(argv: list[str] | None = None) -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--certs", type=Path, required=True,
                        help="folder with ca.crt, server.pem, server.key (pki.py)")
    parser.add_argument("--state-dir", type=Path, required=True,
                        help="persistent folder: state.db (registered SuperNodes, runs)")
    parser.add_argument("--host", default="0.0.0.0", help="bind address (default 0.0.0.0)")
    parser.add_argument("--port", type=int, default=9092, help="HTTPS port (default 9092)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="working directory of the SuperLink and its ServerApp "
                             "(default: --state-dir)")
    parser.add_argument("--log-file", type=Path, default=None, help="also log to this file")
    parser.add_argument("--dry-run", action="store_true", help="print the command, start nothing")
    args = parser.parse_args(argv)
    try:
        for line in check_server_cert(args.certs.expanduser(), [], []):
            print(line, flush=True)
        args.state_dir.expanduser().mkdir(parents=True, exist_ok=True)
        workdir = (args.workdir or args.state_dir).expanduser().resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        command = superlink_command(args.certs, args.state_dir, args.host, args.port,
                                    args.log_file)
    except DeployError as err:
        fail(str(err))
    print(f"working directory: {workdir}", flush=True)
    print(" ".join(command), flush=True)
    if args.dry_run:
        return
    os.chdir(workdir)
    # exec: the SuperLink keeps this PID, so `kill <pid>` stops it gracefully
    os.execve(command[0], command, flower_env())


if __name__ == "__main__":
    main()
