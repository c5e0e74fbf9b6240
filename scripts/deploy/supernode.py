#!/usr/bin/env python3
"""Start a hospital's SuperNode against the consortium SuperLink, with clear failure messages.

    python scripts/deploy/supernode.py --superlink superlink.consortium.example:9092 \\
        --ca certs/ca.crt --key keys/cleveland \\
        --data-path /data/heart/processed.cleveland.data --site-name cleveland [--device cpu]

Before starting ``flower-supernode`` it checks, in this order, and stops with one message
naming the problem:
1. the CA certificate, the private key (EC, OpenSSH format) and the data path exist;
2. the SuperLink answers on host:port (retried up to ``--max-retries`` times within
   ``--max-wait-time`` seconds) and its TLS certificate is signed by this CA and names the
   host dialed (a mismatch is not retried: it will not fix itself).
Then it runs ``flower-supernode --isolation process`` with the same bounded retries and,
next to it, ``flower-superexec`` (through ``superexec.py``, which reaps finished
``flwr-clientapp`` processes), both holding the SuperExec shared secret
``<state-dir>/superexec.secret`` (generated, 0600), prints their log, and when the SuperNode
ends says in one line why and what to do. ``--state-dir`` is the only folder it writes
(FLWR_HOME, umask 077); telemetry and Flower's update check are off; ``--least-privilege``
refuses to run as root or with write access to the data.
Exit statuses (docs/deployment.md, "SuperNode exit statuses"):

0  stopped on request (SIGTERM/SIGINT)           3  SuperLink unreachable at start
1  any other failure (Flower's own exit)         4  certificate mismatch (not retried)
2  bad local setup (files, key format)           5  key not registered, or removed while running
6  lost the SuperLink after connecting (retries exhausted)
2, 4 and 5 do not fix themselves: a restart policy should not retry them.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    DeployError,
    child_processes,
    ensure_secret,
    fail,
    flower_env,
    flower_executable,
    private_dir,
    require_file,
    split_address,
    stop_process,
)

EXIT_FAILED, EXIT_SETUP, EXIT_UNREACHABLE, EXIT_CERTIFICATE = 1, 2, 3, 4
EXIT_NOT_REGISTERED, EXIT_LOST = 5, 6
PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h
FORWARD_DELAY_S = 3.0
GRACEFUL_STOP_S = 30.0  # time a SuperNode that is shutting down gets before a second signal
SUPEREXEC = Path(__file__).resolve().parent / "superexec.py"
SECRET_FILE = "superexec.secret"
# SuperExec asks the SuperNode for a new message every second by default; each round of a
# run waits for it once per message, so poll faster (it is a local HTTP call).
SUPEREXEC_POLL_INTERVAL_S = "0.2"

# Flower log text -> (exit status, what it means for the hospital's IT team), by precedence
HINTS = (
    ("[code: 2004]", EXIT_NOT_REGISTERED,
     "this SuperNode's key is not registered at the SuperLink (or was unregistered). Send "
     "{pub} to the coordinating centre; they run `node_keys.py register`. A key that was "
     "unregistered cannot be registered again: create a new key pair (node_keys.py create)."),
    ("[code: 2001]", EXIT_SETUP,
     "the SuperLink requires SuperNode authentication: start with --key."),
    ("CERTIFICATE_VERIFY_FAILED", EXIT_CERTIFICATE,
     "the SuperLink's certificate is not signed by {ca}: get the current ca.crt from the "
     "coordinating centre."),
    ("Unable to parse the private key", EXIT_SETUP,
     "{key} is not an EC private key in OpenSSH format (create one with `node_keys.py create`)."),
    ("Failed to initialize the connection", EXIT_UNREACHABLE,
     "the SuperNode could not connect to {superlink}: check that the SuperLink runs and that "
     "outgoing TCP to that port is allowed."),
)
REMOVED, LOST = "removed", "lost"  # keys of the two hints below
CONNECTED = "SuperNode ID:"  # Flower logs it once the SuperLink accepted the node
GRACEFUL = "SuperNode terminated gracefully."
REMOVED_HINT = (
    "the SuperLink stopped accepting this SuperNode while it was running: its key was "
    "unregistered (removed from the consortium) at the coordinating centre. That key cannot be "
    "registered again; to rejoin, create a new key pair (node_keys.py create) and send the new "
    "{pub} to the coordinating centre."
)
LOST_HINT = (
    "lost the connection to the SuperLink at {superlink} and could not get it back within "
    "--max-retries/--max-wait-time. The SuperLink may be down or unreachable; a restart "
    "(systemd Restart=on-failure) tries again."
)


class Unreachable(DeployError):
    """The SuperLink did not answer within the retry budget."""


class CertificateMismatch(DeployError):
    """The SuperLink answered with a certificate this CA does not vouch for."""


def privilege_problems(data_path: Path, state_dir: Path) -> list[str]:
    """Ways this SuperNode has more rights than it needs (docs/deployment.md, least privilege):
    running as root, or being able to change the data it trains on."""
    problems = []
    if os.geteuid() == 0:
        problems.append("runs as root: run it as a dedicated user (e.g. fedclinic-node) that "
                        f"can read the data and write only {state_dir}")
    data = data_path.expanduser()
    writable = [p for p in [data, *(data.rglob("*") if data.is_dir() else [])][:1000]
                if os.access(p, os.W_OK)]
    if writable and os.geteuid() != 0:
        problems.append(f"can write {writable[0]}: give this user read-only access to the data")
    return problems


def check_local_files(ca: Path, key: Path | None, data_path: Path) -> None:
    """DeployError naming the first missing/unusable local file."""
    require_file(ca, "CA certificate (--ca)")
    if key is not None:
        try:
            private = load_ssh_private_key(require_file(key, "private key (--key)").read_bytes(),
                                           None)
        except ValueError:
            raise DeployError(f"{key} is not a private key in OpenSSH format (create one with "
                              "`node_keys.py create`)") from None
        if not isinstance(private, ec.EllipticCurvePrivateKey):
            raise DeployError(f"{key} is not an EC key; SuperNode authentication needs EC P-384")
    if not data_path.expanduser().exists():
        raise DeployError(f"--data-path {data_path} does not exist on this machine")


def probe_superlink(address: str, ca: Path, max_retries: int, max_wait_s: float) -> None:
    """Open a TLS connection to ``address`` verified against ``ca``; raise on failure."""
    host, port = split_address(address)
    context = ssl.create_default_context(cafile=str(ca))
    deadline = time.monotonic() + max_wait_s
    attempt, last_error = 0, ""
    while True:
        attempt += 1
        try:
            with socket.create_connection((host, port), timeout=5) as raw, \
                    context.wrap_socket(raw, server_hostname=host):
                return
        except ssl.SSLCertVerificationError as err:
            raise CertificateMismatch(
                f"the SuperLink at {address} presented a certificate that {ca} does not "
                f"accept: {err.verify_message}. Get the current ca.crt from the coordinating "
                "centre and dial the host name or IP written in the SuperLink's certificate."
            ) from None
        except ssl.SSLError as err:
            raise CertificateMismatch(
                f"TLS handshake with {address} failed ({err.reason or err}): is this the "
                "SuperLink's HTTPS port?"
            ) from None
        except OSError as err:
            last_error = f"{type(err).__name__}: {err}"
        if attempt >= max_retries or time.monotonic() >= deadline:
            raise Unreachable(
                f"the SuperLink at {address} is unreachable after {attempt} tries in "
                f"{max_wait_s:.0f}s (last error: {last_error}). Check the address, that the "
                f"SuperLink runs, and that this hospital's firewall allows outgoing TCP to "
                f"{host}:{port}."
            )
        time.sleep(min(2.0 * attempt, 10.0, max(0.0, deadline - time.monotonic())))


def node_config(data_path: Path, site_name: str, device: str | None,
                ckks_secret_context: Path | None = None, ckks_verify_sum: bool = False,
                privacy: dict[str, str | float] | None = None) -> str:
    """The ``--node-config`` string: TOML values, quoted (numbers as numbers)."""
    items: dict[str, str | float] = {"data-path": str(data_path.expanduser().resolve()),
                                     "site-name": site_name}
    if device:
        items["device"] = device
    if ckks_secret_context is not None:  # secagg=ckks: the consortium's secret context
        items["ckks-secret-context"] = str(ckks_secret_context.expanduser().resolve())
    if ckks_verify_sum:  # decrypt only sums this hospital verified itself
        items["ckks-verify-sum"] = "true"
    items.update(privacy or {})  # the hospital's privacy limits and ledger folder
    return " ".join(f"{k}={json.dumps(v)}" for k, v in items.items())


def privacy_node_config(args: argparse.Namespace) -> dict[str, str | float]:
    """The hospital's privacy limits and ledger folder (its state folder) as node_config."""
    state = (args.state_dir or Path.home() / ".fedclinic" / f"supernode-{args.site_name}")
    items: dict[str, str | float] = {"state-dir": str(Path(state).expanduser().resolve())}
    if args.max_epsilon is not None:
        items["privacy-epsilon-budget"] = float(args.max_epsilon)
    if args.max_delta is not None:
        items["privacy-delta"] = float(args.max_delta)
    if args.mechanisms:
        items["privacy-mechanisms"] = args.mechanisms
    if args.ledger_scope:
        items["privacy-ledger-scope"] = args.ledger_scope
    return items


def supernode_command(args: argparse.Namespace, secret: Path) -> list[str]:
    """The ``flower-supernode`` command line; ``secret`` authenticates its SuperExec."""
    command = [
        flower_executable("flower-supernode"),
        "--superlink", args.superlink,
        "--root-certificates", str(args.ca.expanduser().resolve()),
        "--node-config", node_config(args.data_path, args.site_name, args.device,
                                     args.ckks_secret_context, args.ckks_verify_sum,
                                     privacy_node_config(args)),
        "--max-retries", str(args.max_retries),
        "--max-wait-time", str(args.max_wait_time),
        "--host", args.runtime_host,
        "--port", str(args.runtime_port),
        # the launcher starts the SuperExec itself (superexec_command), so that finished
        # flwr-clientapp processes are reaped
        "--isolation", "process",
        "--superexec-auth-secret-file", str(secret),
    ]
    if args.key is not None:
        command += ["--auth-supernode-private-key", str(args.key.expanduser().resolve())]
    return command


def superexec_command(args: argparse.Namespace, secret: Path) -> list[str]:
    """Flower's ``flower-superexec`` for this SuperNode's local Runtime API, through
    superexec.py (which reaps each finished flwr-clientapp); it ends with this launcher. The
    Runtime API is plain HTTP on loopback: the shared secret (HMAC-signed requests) keeps
    other local processes from claiming this hospital's tasks."""
    host = "127.0.0.1" if args.runtime_host in ("0.0.0.0", "") else args.runtime_host
    return [
        sys.executable, str(SUPEREXEC), "--insecure",
        "--runtime-api-address", f"{host}:{args.runtime_port}",
        "--superexec-auth-secret-file", str(secret),
        "--parent-pid", str(os.getpid()),
    ]


def _become_subreaper() -> bool:
    """Linux: adopt orphaned descendants, so Flower's helper processes that outlive the
    SuperNode (its flower-superexec) can be stopped here instead of lingering."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _children() -> list[int]:
    """PIDs of this process's children that are still running (not zombies)."""
    return [pid for pid, _, state in child_processes(os.getpid()) if state != "Z"]


def _stop_leftovers(grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL, the adopted helpers still running after the SuperNode ended."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _children():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while _children() and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(-1, os.WNOHANG)
            time.sleep(0.1)
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


# Flower 1.42 logs this when its reconnection budget is spent, then hangs in interpreter
# shutdown (its threads do not end): the launcher ends it after GIVE_UP_GRACE_S.
GAVE_UP = "Giving up reconnection"
GIVE_UP_GRACE_S = 10.0
# Flower's log when the SuperLink went away after the SuperNode had connected
NETWORK_ERRORS = (GAVE_UP, "Connection refused", "ConnectError", "ConnectTimeout",
                  "RemoteProtocolError", "Exit Code: 305", "Failed to initialize the connection")


@dataclass
class Observed:
    """What the launcher saw of one SuperNode's life (filled in from its log and signals)."""

    patterns: list[str] = field(default_factory=list)  # HINTS patterns seen, in order
    connected: bool = False  # "SuperNode ID:" was logged
    graceful: bool = False  # "SuperNode terminated gracefully." was logged
    network_error: bool = False  # a transport error was logged
    gave_up: bool = False  # Flower spent its reconnection budget
    stop_requested: bool = False  # this launcher got SIGTERM/SIGINT

    def see(self, line: str) -> None:
        """Record what ``line`` of Flower's log tells."""
        self.patterns.extend(pattern for pattern, _, _ in HINTS if pattern in line)
        self.connected = self.connected or CONNECTED in line
        self.graceful = self.graceful or GRACEFUL in line
        self.network_error = self.network_error or any(e in line for e in NETWORK_ERRORS)
        self.gave_up = self.gave_up or GAVE_UP in line


def outcome(rc: int, seen: Observed, hints: dict[str, str]) -> tuple[int, str | None]:
    """The launcher's exit status and the one-line reason (None: nothing to explain).

    Flower exits 0 ("terminated gracefully") both when asked to stop and when the SuperLink
    rejects the node's signature while it runs (its key was unregistered): only the launcher
    knows whether a stop was requested, so an unrequested graceful exit is the removal.
    """
    if seen.stop_requested:  # a stop that ended by the signal itself is still a clean stop
        return (0 if rc in (0, -signal.SIGTERM, -signal.SIGINT) else rc), None
    for pattern, status, _ in HINTS:  # in order of precedence
        if pattern in seen.patterns and not (seen.connected and status == EXIT_UNREACHABLE):
            return status, hints[pattern]
    if seen.connected and seen.gave_up:
        return EXIT_LOST, hints[LOST]
    if rc == 0 and seen.connected and seen.graceful:
        return EXIT_NOT_REGISTERED, hints[REMOVED]
    if seen.connected and seen.network_error:
        return EXIT_LOST, hints[LOST]
    if rc == 0:
        return EXIT_FAILED, ("flower-supernode ended without being asked to stop (status 0) "
                             "and without saying why; see its log above")
    return rc, f"flower-supernode failed (exit code {rc}); see its log above"


def run_supervised(command: list[str], hints: dict[str, str], helper: list[str],
                   env_extra: dict[str, str] | None = None) -> int:
    """Run ``command`` (flower-supernode) and ``helper`` (its SuperExec) beside it, echo their
    logs, forward SIGTERM/SIGINT; when the SuperNode ends, stop the helper and say why in one
    line; return the launcher's exit status (module docstring)."""
    adopted = _become_subreaper()
    env = flower_env({"PYTHONUNBUFFERED": "1",
                      "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": SUPEREXEC_POLL_INTERVAL_S,
                      **(env_extra or {})})
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, errors="replace", env=env)
    superexec = subprocess.Popen(helper, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True, errors="replace", env=env)
    seen = Observed()

    def forward(signum: int, _frame: FrameType | None) -> None:
        # A stop request often reaches the whole process group (systemd, Ctrl-C, kill -- -PGID),
        # i.e. the SuperNode too. Flower restores the default handler after the first signal,
        # so a second one would kill it before it deactivates at the SuperLink: forward only
        # if it is still running a moment later (e.g. `docker stop` signals PID 1 alone).
        seen.stop_requested = True

        def later() -> None:
            try:
                child.wait(timeout=FORWARD_DELAY_S)
                return
            except subprocess.TimeoutExpired:
                pass
            if seen.graceful:  # it got the signal and is shutting down: do not cut that short
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.wait(timeout=GRACEFUL_STOP_S)
            if child.poll() is None:
                child.send_signal(signum)

        threading.Thread(target=later, daemon=True).start()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)

    def end_hung_supernode() -> None:
        try:
            child.wait(timeout=GIVE_UP_GRACE_S)
        except subprocess.TimeoutExpired:
            child.terminate()
            try:
                child.wait(timeout=5)
            except subprocess.TimeoutExpired:
                child.kill()

    def echo(proc: subprocess.Popen[str], observe: bool) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            if observe:
                seen.see(line)
                if GAVE_UP in line:
                    threading.Thread(target=end_hung_supernode, daemon=True).start()

    # Read in threads: Flower's helpers inherit the pipes and may keep them open after the
    # SuperNode itself has exited, so end-of-file is no sign that it stopped.
    readers = [threading.Thread(target=echo, args=(p, p is child), daemon=True)
               for p in (child, superexec)]
    for reader in readers:
        reader.start()
    rc = child.wait()
    readers[0].join(timeout=2.0)
    stop_process(superexec)  # no ClientApp can start without the SuperNode
    if adopted:
        _stop_leftovers()
    status, reason = outcome(rc, seen, hints)
    if reason is not None:
        print(f"error: SuperNode stopped (exit status {status}): {reason}", file=sys.stderr,
              flush=True)
    return status


def main(argv: list[str] | None = None) -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--superlink", required=True, help="SuperLink host:port")
    parser.add_argument("--ca", type=Path, required=True, help="consortium ca.crt")
    parser.add_argument("--key", type=Path, default=None,
                        help="this hospital's private key (node_keys.py create)")
    parser.add_argument("--data-path", type=Path, required=True,
                        help="this hospital's data (file or folder, per task)")
    parser.add_argument("--site-name", required=True, help="this hospital's site name")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: auto)")
    parser.add_argument("--max-epsilon", type=float, default=None,
                        help="the most epsilon this hospital spends, over every run on this "
                        "data (node_config privacy-epsilon-budget)")
    parser.add_argument("--max-delta", type=float, default=None,
                        help="the largest delta accepted (default 1e-5; never above 1/(10 N))")
    parser.add_argument("--mechanisms", default=None,
                        help="privacy mechanisms accepted, comma-separated: local_dp, "
                        "central_dp, none (default: both DP ones, plus none without a cap)")
    parser.add_argument("--ledger-scope", choices=("data", "run"), default=None,
                        help="epsilon composes over every run on this data (data, default) "
                        "or within one run")
    parser.add_argument("--ckks-secret-context", type=Path, default=None,
                        help="secagg=ckks: the consortium's secret context (ckks_keys.py "
                             "create); node config key ckks-secret-context")
    parser.add_argument("--ckks-verify-sum", action="store_true",
                        help="secagg=ckks: decrypt only sums this hospital verified itself "
                             "(node config ckks-verify-sum=true; runs need secagg.verify_sum)")
    parser.add_argument("--max-retries", type=int, default=30,
                        help="connection attempts before giving up (default 30)")
    parser.add_argument("--max-wait-time", type=float, default=600.0,
                        help="seconds of trying to connect before giving up (default 600)")
    parser.add_argument("--runtime-host", default="127.0.0.1",
                        help="local Runtime API bind address (default 127.0.0.1)")
    parser.add_argument("--runtime-port", type=int, default=9094,
                        help="local Runtime API port; distinct per SuperNode on one host")
    parser.add_argument("--skip-probe", action="store_true",
                        help="start flower-supernode without the TLS pre-check")
    parser.add_argument("--state-dir", type=Path, default=None,
                        help="the SuperNode's only writable folder: Flower's app cache "
                             "(FLWR_HOME) and the SuperExec secret (default "
                             "~/.fedclinic/supernode-<site-name>)")
    parser.add_argument("--least-privilege", action="store_true",
                        help="refuse to start as root or with write access to the data "
                             "(otherwise a warning)")
    args = parser.parse_args(argv)
    os.umask(0o077)  # everything the SuperNode writes: owner-only
    try:
        check_local_files(args.ca, args.key, args.data_path)
        state_dir = (args.state_dir or
                     Path.home() / ".fedclinic" / f"supernode-{args.site_name}").expanduser()
        problems = privilege_problems(args.data_path, state_dir)
        if problems and args.least_privilege:
            raise DeployError("--least-privilege: this SuperNode " + "; ".join(problems))
        for problem in problems:
            print(f"warning: this SuperNode {problem}", file=sys.stderr, flush=True)
        if args.ckks_secret_context is not None:
            require_file(args.ckks_secret_context, "CKKS secret context (--ckks-secret-context)")
        if not args.skip_probe:
            probe_superlink(args.superlink, args.ca.expanduser(), args.max_retries,
                            args.max_wait_time)
            print(f"SuperLink {args.superlink} reachable; its certificate matches {args.ca}",
                  flush=True)
        state_dir = private_dir(state_dir)
        secret = ensure_secret(state_dir / SECRET_FILE)
        command = supernode_command(args, secret)
    except Unreachable as err:
        fail(str(err), EXIT_UNREACHABLE)
    except CertificateMismatch as err:
        fail(str(err), EXIT_CERTIFICATE)
    except DeployError as err:
        fail(str(err), EXIT_SETUP)
    pub = args.key.with_name(args.key.name + ".pub") if args.key else Path("<key>.pub")
    texts = {**{p: h for p, _, h in HINTS}, REMOVED: REMOVED_HINT, LOST: LOST_HINT}
    hints = {p: h.format(pub=pub, ca=args.ca, key=args.key, superlink=args.superlink)
             for p, h in texts.items()}
    raise SystemExit(run_supervised(command, hints, superexec_command(args, secret),
                                    {"FLWR_HOME": str(state_dir)}))


if __name__ == "__main__":
    main()
